"""Idempotency keys: a POST that carries `Idempotency-Key` starts its turn once; a retry with
the same key and body within the window gets that turn back, the same key with another body 422.
"""

import asyncio
import hashlib
import json
import logging
import re
import uuid
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import ForeignKey, String, UniqueConstraint, Uuid, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from chatbot.chat.errors import IdempotencyKeyReused, InvalidIdempotencyKey
from chatbot.db import Base, UTCDateTime, new_id, utcnow

logger = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)
PURGE_EVERY_SECONDS = 60.0
KEY_PATTERN = r"^[!-~]([ -~]{0,253}[!-~])?$"
"""1 to 255 visible ASCII characters, inner spaces allowed (a structured-field string)."""
_KEY = re.compile(KEY_PATTERN)


class IdempotencyKey(Base):
    """A POST that carried `Idempotency-Key`, and the turn it started."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("user_id", "key"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    user_message_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    assistant_message_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


def validated_key(key: str | None) -> str | None:
    if key is not None and _KEY.fullmatch(key) is None:
        raise InvalidIdempotencyKey()
    return key


def request_hash(target: str, body: BaseModel) -> str:
    """What a retry must repeat: the target and the body (a retry may change `background`)."""
    canonical = json.dumps(
        [target, body.model_dump(mode="json", exclude={"background"})], sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def find(session: AsyncSession, user_id: str, key: str, hashed: str) -> IdempotencyKey | None:
    """The record of an earlier request with this key within the window; 422 if that request
    was a different one."""
    record = await session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at >= utcnow() - WINDOW,
        )
    )
    if record is not None and record.request_hash != hashed:
        raise IdempotencyKeyReused()
    return record


async def record(
    session: AsyncSession,
    *,
    user_id: str,
    key: str,
    hashed: str,
    conversation_id: uuid.UUID,
    user_message_id: uuid.UUID,
    assistant_message_id: uuid.UUID,
) -> None:
    """Remember the turn a key started, in the turn's transaction: a concurrent request with
    the same key fails on the unique constraint and finds this one instead."""
    # An expired record of the same key would block the unique constraint.
    await session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.user_id == user_id,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at < utcnow() - WINDOW,
        )
    )
    session.add(
        IdempotencyKey(
            user_id=user_id,
            key=key,
            request_hash=hashed,
            conversation_id=conversation_id,
            user_message_id=user_message_id,
            assistant_message_id=assistant_message_id,
            created_at=utcnow(),
        )
    )


async def purge(session: AsyncSession) -> None:
    await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - WINDOW)
    )


async def purge_forever(
    sessionmaker: async_sessionmaker[AsyncSession], every_seconds: float = PURGE_EVERY_SECONDS
) -> None:
    """Forget keys past the window, now and then; errors are logged, never fatal."""
    while True:
        try:
            async with sessionmaker() as session:
                await purge(session)
                await session.commit()
        except Exception:
            logger.warning("could not forget old idempotency keys", exc_info=True)
        await asyncio.sleep(every_seconds)

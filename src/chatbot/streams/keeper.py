"""Keeps the database's view of running replies true: checkpoints and the sweep.

Every few seconds one transaction saves the new text of each running reply of this process
(so a crash loses at most that much) and marks it alive. Replies that no process has
checkpointed for a while belong to a dead process: the sweep stores them `incomplete` and frees
their conversations. Both are single statements over all rows, so several instances can run
them side by side.
"""

import asyncio
import logging
import uuid
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.chat.models import IdempotencyKey
from chatbot.conversations import repository as conversations
from chatbot.db import utcnow
from chatbot.messages.models import Message, MessageStatus
from chatbot.streams.registry import ReplyRegistry, StopReason

logger = logging.getLogger(__name__)

IDEMPOTENCY_WINDOW = timedelta(hours=24)
INTERRUPTED = {
    "code": "interrupted",
    "detail": "The service stopped while generating this reply",
    "status": 503,
}

_messages = cast(Table, Message.__table__)
_save_content = (
    update(_messages)
    .where(
        _messages.c.id == bindparam("message_id"),
        _messages.c.status == MessageStatus.IN_PROGRESS,
        # A round of tool calls moved the row and took its text meanwhile: this snapshot is old.
        _messages.c.seq == func.coalesce(bindparam("at_seq"), _messages.c.seq),
    )
    .values(content=bindparam("new_content"), checkpoint_at=bindparam("now"))
)


class ReplyKeeper:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        registry: ReplyRegistry,
        *,
        interval_seconds: float,
        stale_after_seconds: float,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._registry = registry
        self._interval = interval_seconds
        self._stale_after = timedelta(seconds=stale_after_seconds)

    async def run(self) -> None:
        """Checkpoint every interval and sweep every few; errors are logged, never fatal."""
        rounds = 0
        while True:
            await asyncio.sleep(self._interval)
            rounds += 1
            try:
                await self.checkpoint()
                if rounds % 5 == 0:
                    await self.sweep()
            except Exception:
                logger.exception("reply checkpoint failed; retrying in %gs", self._interval)

    async def checkpoint(self) -> None:
        running = [g for g in self._registry.running() if not g.finishing]
        if not running:
            return
        now = utcnow()
        snapshots = [
            (generation, generation.content, generation.length, generation.reply_seq)
            for generation in running
            if generation.length != generation.saved_length
        ]
        async with self._sessionmaker() as session:
            if snapshots:
                await session.execute(
                    _save_content,
                    [
                        {
                            "message_id": generation.message_id,
                            "new_content": content,
                            "now": now,
                            "at_seq": seq,
                        }
                        for generation, content, _, seq in snapshots
                    ],
                )
            ids = [generation.message_id for generation in running]
            await session.execute(
                update(Message)
                .where(Message.id.in_(ids), Message.status == MessageStatus.IN_PROGRESS)
                .values(checkpoint_at=now)
            )
            still_running = set(
                await session.scalars(
                    select(Message.id).where(
                        Message.id.in_(ids), Message.status == MessageStatus.IN_PROGRESS
                    )
                )
            )
            await session.commit()
        # Finished elsewhere: cancelled on another instance, swept, or deleted with its
        # conversation. Replies that started storing themselves meanwhile are left alone.
        finished_elsewhere = [
            generation.message_id
            for generation in running
            if generation.message_id not in still_running and not generation.finishing
        ]
        for generation, _, length, _ in snapshots:
            generation.saved_length = length
        for message_id in finished_elsewhere:
            logger.info("reply %s was finished elsewhere; stopping it here", message_id)
            await self._registry.stop(message_id, StopReason.SUPERSEDED)

    async def sweep(self) -> list[uuid.UUID]:
        """Store replies a dead process abandoned as `incomplete`; forget old idempotency keys."""
        now = utcnow()
        local = {generation.message_id for generation in self._registry.running()}
        async with self._sessionmaker() as session:
            stale = [
                message_id
                for message_id in await session.scalars(
                    select(Message.id).where(
                        Message.status == MessageStatus.IN_PROGRESS,
                        # Rows from before checkpoints existed have none: stale by definition.
                        or_(
                            Message.checkpoint_at < now - self._stale_after,
                            Message.checkpoint_at.is_(None),
                        ),
                    )
                )
                if message_id not in local
            ]
            if stale:
                await session.execute(
                    update(Message)
                    .where(Message.id.in_(stale), Message.status == MessageStatus.IN_PROGRESS)
                    .values(status=MessageStatus.INCOMPLETE, error=INTERRUPTED, completed_at=now)
                )
                await conversations.release_replies(session, stale)
            await session.execute(
                delete(IdempotencyKey).where(IdempotencyKey.created_at < now - IDEMPOTENCY_WINDOW)
            )
            await session.commit()
        if stale:
            logger.warning("marked %d abandoned replies incomplete", len(stale))
        return stale

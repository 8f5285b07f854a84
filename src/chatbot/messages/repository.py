import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.db import changed_rows
from chatbot.messages.models import Message, MessageStatus, Role


async def list_after(
    session: AsyncSession, conversation_id: uuid.UUID, *, after_seq: int, limit: int
) -> list[Message]:
    return list(
        await session.scalars(
            select(Message)
            .where(Message.conversation_id == conversation_id, Message.seq > after_seq)
            .order_by(Message.seq)
            .limit(limit)
        )
    )


async def newest_first(
    session: AsyncSession,
    conversation_id: uuid.UUID,
    *,
    before_seq: int,
    after_seq: int,
    limit: int,
) -> list[Message]:
    """Up to `limit` messages strictly between two positions, newest first, from the index."""
    rows = await session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.seq < before_seq,
            Message.seq > after_seq,
        )
        .order_by(Message.seq.desc())
        .limit(limit)
    )
    return list(rows)


async def between(
    session: AsyncSession, conversation_id: uuid.UUID, *, after_seq: int, before_seq: int
) -> list[Message]:
    """The messages strictly between two positions, oldest first."""
    rows = await session.scalars(
        select(Message)
        .where(
            Message.conversation_id == conversation_id,
            Message.seq > after_seq,
            Message.seq < before_seq,
        )
        .order_by(Message.seq)
    )
    return list(rows)


async def turn_of(session: AsyncSession, reply: Message) -> list[Message]:
    """The user message that started a reply's turn and the tool calls and results stored
    since, oldest first: everything from the turn's start up to the reply."""
    start = (
        select(func.max(Message.seq))
        .where(
            Message.conversation_id == reply.conversation_id,
            Message.seq < reply.seq,
            Message.role == Role.USER,
        )
        .scalar_subquery()
    )
    rows = await session.scalars(
        select(Message)
        .where(
            Message.conversation_id == reply.conversation_id,
            Message.seq >= start,
            Message.seq < reply.seq,
        )
        .order_by(Message.seq)
    )
    return list(rows)


async def get(session: AsyncSession, message_id: uuid.UUID) -> Message | None:
    return await session.get(Message, message_id, populate_existing=True)


async def finish(
    session: AsyncSession, message_id: uuid.UUID, values: dict[str, Any]
) -> Message | None:
    """Store a reply's end, unless it was already finished (cancelled elsewhere, or swept).

    Returns the stored row, or None if it was already final or is gone."""
    stored: Message | None = await session.scalar(
        update(Message)
        .where(Message.id == message_id, Message.status == MessageStatus.IN_PROGRESS)
        .values(**values)
        .returning(Message)
        .execution_options(populate_existing=True, synchronize_session=False)
    )
    return stored


async def move_reply(
    session: AsyncSession, message_id: uuid.UUID, *, from_seq: int, to_seq: int
) -> bool:
    """Move a running reply to a later position and empty it: its text so far belongs to the
    message that called tools, which takes its place. False if it is no longer running."""
    result = await session.execute(
        update(Message)
        .where(
            Message.id == message_id,
            Message.seq == from_seq,
            Message.status == MessageStatus.IN_PROGRESS,
        )
        .values(seq=to_seq, content="")
        .execution_options(synchronize_session=False)
    )
    return changed_rows(result) > 0


def add(session: AsyncSession, *messages: Message) -> None:
    session.add_all(messages)

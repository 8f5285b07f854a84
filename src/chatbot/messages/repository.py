import uuid
from typing import Any

from sqlalchemy import Row, bindparam, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.db import detached
from chatbot.messages.models import Message, Role

_FIELDS = [prop.key for prop in inspect(Message).column_attrs]
COLUMNS = [prop.columns[0] for prop in inspect(Message).column_attrs]
"""A message's columns, in the order `from_row` reads them: for statements on the way of every
turn, which read them as Core rows rather than through the session."""


def from_row(row: Row[Any]) -> Message:
    """A row of `COLUMNS` as a Message of no session, for reading: loading entities through the
    session (identity map, instance states) cost more than the statement."""
    return detached(Message, dict(zip(_FIELDS, row, strict=True)))


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
    """Up to `limit` messages strictly between two positions, newest first, from the index,
    holding what a context is planned from (`PROMPT_FIELDS`); their other attributes read
    None. Every turn reads a page of these: the rest of each row (times, usage, errors) would
    cost more to convert than the prompt's own columns."""
    result = await session.execute(
        _newest_first,
        {
            "conversation_id": conversation_id,
            "before_seq": before_seq,
            "after_seq": after_seq,
            "limit": limit,
        },
    )
    return [detached(Message, dict(zip(PROMPT_FIELDS, row, strict=True))) for row in result]


PROMPT_FIELDS = (
    "id",
    "seq",
    "role",
    "status",
    "content",
    "token_count",
    "tool_calls",
    "tool_call_id",
)
_table = Message.__table__.c
_newest_first = (
    select(*(_table[field] for field in PROMPT_FIELDS))
    .where(
        _table.conversation_id == bindparam("conversation_id"),
        _table.seq < bindparam("before_seq"),
        _table.seq > bindparam("after_seq"),
    )
    .order_by(_table.seq.desc())
    .limit(bindparam("limit"))
)


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

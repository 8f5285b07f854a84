import uuid
from typing import Any, cast

from sqlalchemy import Row, bindparam, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.db import detached
from chatbot.messages.models import Message, PromptMessage, Role

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
) -> list[PromptMessage]:
    """Up to `limit` messages strictly between two positions, newest first, from the index, as
    rows of what a context is planned from (`PROMPT_FIELDS`). Every turn reads a page of these:
    the rest of each row (times, usage, errors) would cost more to convert than the prompt's
    own columns, and entities more to build than the rows."""
    result = await session.execute(
        _newest_first,
        {
            "conversation_id": conversation_id,
            "before_seq": before_seq,
            "after_seq": after_seq,
            "limit": limit,
        },
    )
    return cast(list[PromptMessage], list(result))


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
_column = {prop.key: prop.columns[0] for prop in inspect(Message).column_attrs}
_newest_first = (
    # Core columns: ORM attributes would send the statement down the ORM's path.
    select(*(_column[field] for field in PROMPT_FIELDS))
    .where(
        _column["conversation_id"] == bindparam("conversation_id"),
        _column["seq"] < bindparam("before_seq"),
        _column["seq"] > bindparam("after_seq"),
    )
    .order_by(_column["seq"].desc())
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

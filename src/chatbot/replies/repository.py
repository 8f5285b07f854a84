"""Every statement that writes a reply's rows: its start (with the user message that asks for
it), checkpoints, tool rounds, its end (by its runner, by a cancel from elsewhere, by the
sweep). Each runs in the caller's transaction and the caller commits, except `finish_at_once`,
a transaction of its own. Nothing outside this package writes a reply row."""

import functools
import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Select, Table, Update, bindparam, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.conversations import repository as conversations
from chatbot.db import changed_rows, detached
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.quotas import service as quotas
from chatbot.replies.live import ReplyRef, Snapshot
from chatbot.replies.status import Mover, check_move

_messages = cast(Table, Message.__table__)
_save_content = (
    update(_messages)
    .where(
        _messages.c.id == bindparam("message_id"),
        _messages.c.status == MessageStatus.IN_PROGRESS,
        # A round of tool calls moved the row and took its text meanwhile: this snapshot is old.
        _messages.c.seq == bindparam("at_seq"),
    )
    .values(content=bindparam("new_content"), checkpoint_at=bindparam("now"))
)


async def add_turn(
    session: AsyncSession,
    user_message: Message,
    ref: ReplyRef,
    *,
    model: str,
    prompt_token_count: int,
    prompt_hash: str,
) -> Message:
    """The user message and its reply's row, `in_progress` from the moment the turn commits,
    in one statement: the unit of work sends two rows as an executemany, which costs the
    driver more than the rows do."""
    reply = detached(
        Message,
        {
            "id": ref.message_id,
            "conversation_id": ref.conversation_id,
            "seq": user_message.seq + 1,
            "role": Role.ASSISTANT,
            "content": "",
            "status": MessageStatus.IN_PROGRESS,
            "model": model,
            "prompt_token_count": prompt_token_count,
            "prompt_hash": prompt_hash,
            "created_at": user_message.created_at,
            "checkpoint_at": user_message.created_at,
        },
    )
    await session.execute(
        _ADD_TURN,
        {
            f"{column}_{index}": getattr(row, column)
            for index, row in enumerate((user_message, reply))
            for column in _TURN_COLUMNS
        },
    )
    return reply


_TURN_COLUMNS = (
    # What a turn's two new rows may hold; the others (JSON ones among them, where a None
    # given would be stored as JSON null) are left to their defaults.
    "id",
    "conversation_id",
    "seq",
    "role",
    "content",
    "status",
    "model",
    "token_count",
    "prompt_token_count",
    "prompt_hash",
    "created_at",
    "completed_at",
    "checkpoint_at",
)
_ADD_TURN = text(
    # As text: SQLAlchemy compiles a multi-row `insert().values([...])` anew at every execution
    # (it is not cached), which cost more than the rest of the turn's statements together.
    # Only this module's own names go into it; every value is a bound parameter.
    f"INSERT INTO {_messages.name} ({', '.join(_TURN_COLUMNS)}) VALUES "  # noqa: S608
    + ", ".join(
        "(" + ", ".join(f":{column}_{index}" for column in _TURN_COLUMNS) + ")"
        for index in range(2)
    )
).bindparams(
    # Typed, so that each value is stored as its column stores it (UUIDs, enums, times).
    *(
        bindparam(f"{column}_{index}", type_=_messages.c[column].type)
        for index in range(2)
        for column in _TURN_COLUMNS
    )
)


# --- checkpoints ------------------------------------------------------------------------------


def _content_parameters(snapshot: Snapshot, now: datetime) -> dict[str, Any]:
    return {
        "message_id": snapshot.message_id,
        "new_content": snapshot.content,
        "now": now,
        "at_seq": snapshot.seq,
    }


async def save_contents(
    session: AsyncSession, snapshots: Sequence[Snapshot], now: datetime
) -> None:
    """The text of running replies so far, in one statement."""
    await session.execute(_save_content, [_content_parameters(each, now) for each in snapshots])


async def mark_alive(
    session: AsyncSession, message_ids: Collection[uuid.UUID], now: datetime
) -> set[uuid.UUID]:
    """Mark replies as alive; returns those still `in_progress` (others were finished
    elsewhere: cancelled on another instance, swept, or deleted with their conversation)."""
    await session.execute(
        update(Message)
        .where(Message.id.in_(message_ids), Message.status == MessageStatus.IN_PROGRESS)
        .values(checkpoint_at=now)
    )
    running = await session.scalars(
        select(Message.id).where(
            Message.id.in_(message_ids), Message.status == MessageStatus.IN_PROGRESS
        )
    )
    return set(running)


# --- tool rounds ------------------------------------------------------------------------------


async def store_calls(
    session: AsyncSession, ref: ReplyRef, *, seq: int, calling: Message, results: int
) -> bool:
    """Put the message that called tools where the reply stood, keep a position for each of
    its `results`, and move the reply after them, emptied: its text so far is the calling
    message's. False when the reply no longer holds its conversation (cancelled, swept or
    deleted elsewhere)."""
    positions = results + 1
    if not await conversations.extend_reply(
        session, ref.conversation_id, ref.message_id, positions
    ):
        return False
    moved = await session.execute(
        update(Message)
        .where(
            Message.id == ref.message_id,
            Message.seq == seq,
            Message.status == MessageStatus.IN_PROGRESS,
        )
        .values(seq=seq + positions, content="")
        .execution_options(synchronize_session=False)
    )
    if not changed_rows(moved):
        return False
    session.add(calling)
    return True


def add_tool_results(session: AsyncSession, results: Sequence[Message]) -> None:
    session.add_all(results)


# --- the end ----------------------------------------------------------------------------------


async def finish(
    session: AsyncSession, ref: ReplyRef, mover: Mover, values: dict[str, Any]
) -> Message | None:
    """End a reply and free its conversation, unless it was already final (finished elsewhere)
    or is gone. Returns the stored row, or None."""
    check_move(mover, values["status"])
    result = await session.execute(
        _finish_statement(frozenset(values)), _finish_parameters(ref, values)
    )
    stored = _detached(result.first())
    await conversations.release_reply(session, ref.conversation_id, ref.message_id)
    return stored


async def finish_at_once(
    session: AsyncSession, ref: ReplyRef, mover: Mover, values: dict[str, Any], *, tokens: int
) -> Message | None:
    """`finish`, and `tokens` added to the user's day, in one statement of its own on
    PostgreSQL (its data-modifying CTEs): one round trip instead of five, with no transaction
    around it (a statement is one already). The session must not have begun one."""
    check_move(mover, values["status"])
    await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    result = await session.execute(
        _finish_at_once(frozenset(values)),
        {
            **_finish_parameters(ref, values),
            **conversations.release_parameters(ref.conversation_id, ref.message_id),
            **quotas.usage_parameters(ref.user_id, tokens),
        },
    )
    return _detached(result.first())


def _finish_parameters(ref: ReplyRef, values: dict[str, Any]) -> dict[str, Any]:
    return {"message_id": ref.message_id, **{f"new_{key}": value for key, value in values.items()}}


def _ending(columns: frozenset[str]) -> Update:
    return (
        update(_messages)
        .where(
            _messages.c.id == bindparam("message_id"),
            _messages.c.status == MessageStatus.IN_PROGRESS,
        )
        .values({column: bindparam(f"new_{column}") for column in sorted(columns)})
    )


def _detached(row: Row[Any] | None) -> Message | None:
    # The row is only read, to build the outcome: not through the session.
    return None if row is None else messages.from_row(row)


@functools.cache
def _finish_statement(columns: frozenset[str]) -> Update:
    """The end of a reply setting `columns`: one statement for each set of them, built once."""
    return _ending(columns).returning(*messages.COLUMNS)


@functools.cache
def _finish_at_once(columns: frozenset[str]) -> Select[Any]:
    ended = _ending(columns).returning(*_messages.c).cte("ended")
    freed = conversations.RELEASE.cte("freed")
    spent = quotas.usage_added("postgresql").cte("spent")
    return select(*(ended.c[column.name] for column in messages.COLUMNS)).add_cte(freed, spent)


async def stale(session: AsyncSession, stale_before: datetime) -> list[uuid.UUID]:
    """The running replies nobody has checkpointed since `stale_before`."""
    rows = await session.scalars(
        select(Message.id).where(
            Message.status == MessageStatus.IN_PROGRESS,
            # Rows from before checkpoints existed have none: stale by definition.
            or_(Message.checkpoint_at < stale_before, Message.checkpoint_at.is_(None)),
        )
    )
    return list(rows)


async def abandon(
    session: AsyncSession,
    message_ids: Collection[uuid.UUID],
    *,
    stale_before: datetime,
    error: dict[str, Any],
    now: datetime,
    contents: Mapping[uuid.UUID, str] | None = None,
) -> list[uuid.UUID]:
    """End those of the replies that are still stale (a producer may have marked one alive
    since they were found) as `incomplete`, with their last checkpoint or the text given in
    `contents`, and free their conversations. Returns the ones ended."""
    status = check_move(Mover.SWEEP, MessageStatus.INCOMPLETE)
    still_stale = (
        Message.status == MessageStatus.IN_PROGRESS,
        or_(Message.checkpoint_at < stale_before, Message.checkpoint_at.is_(None)),
    )
    for message_id, content in (contents or {}).items():
        await session.execute(
            update(Message)
            .where(Message.id == message_id, *still_stale)
            .values(content=content)
            .execution_options(synchronize_session=False)
        )
    ended = list(
        await session.scalars(
            update(Message)
            .where(Message.id.in_(message_ids), *still_stale)
            .values(status=status, error=error, completed_at=now)
            .returning(Message.id)
            .execution_options(synchronize_session=False)
        )
    )
    if ended:
        await conversations.release_replies(session, ended)
    return ended

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    Table,
    bindparam,
    delete,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.conversations.errors import TooManyConversations
from chatbot.conversations.models import Conversation
from chatbot.db import changed_rows, detached, take_turns, utcnow


async def get_owned(
    session: AsyncSession, user_id: str, conversation_id: uuid.UUID
) -> Conversation | None:
    return await session.scalar(
        select(Conversation).where(
            Conversation.id == conversation_id, Conversation.user_id == user_id
        )
    )


async def list_recent(
    session: AsyncSession,
    user_id: str,
    *,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[Conversation]:
    """A user's conversations, most recent activity first, after a keyset position."""
    query = select(Conversation).where(Conversation.user_id == user_id)
    if before is not None:
        updated_at, conversation_id = before
        query = query.where(
            or_(
                Conversation.updated_at < updated_at,
                (Conversation.updated_at == updated_at) & (Conversation.id < conversation_id),
            )
        )
    query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit)
    return list(await session.scalars(query))


async def add_within(session: AsyncSession, conversation: Conversation, *, limit: int) -> None:
    """Add a conversation unless its user has `limit` already: added, then counted in the same
    transaction under the user's turn lock (on SQLite the write is the lock), so concurrent
    creations cannot both pass; the count reads at most `limit` + 1 rows of the user's index,
    so it costs little below the limit. The caller rolls back what a refusal leaves."""
    session.add(conversation)
    await session.flush()
    await _take_user_turns(session, conversation.user_id)
    owned = (
        select(Conversation.id).where(Conversation.user_id == conversation.user_id).limit(limit + 1)
    )
    if (await session.scalar(select(func.count()).select_from(owned.subquery())) or 0) > limit:
        raise TooManyConversations(f"A user may have at most {limit} conversations")


async def delete_owned(session: AsyncSession, user_id: str, conversation_id: uuid.UUID) -> bool:
    result = await session.execute(
        delete(Conversation).where(
            Conversation.id == conversation_id, Conversation.user_id == user_id
        )
    )
    return changed_rows(result) > 0


_TURNS_LOCK = "chatbot:turns:"


async def _take_user_turns(session: AsyncSession, user_id: str) -> None:
    """The user's turn lock, until the transaction ends (see `claim_reply`)."""
    await take_turns(session, _TURNS_LOCK + user_id)


async def claim_reply(
    session: AsyncSession,
    user_id: str,
    conversation_id: uuid.UUID,
    reply_id: uuid.UUID,
    *,
    max_running: int,
) -> Conversation | None:
    """Claim an idle conversation for one reply and two message positions, atomically, if the
    user has fewer than `max_running` replies under way: one round trip on the way to the model.

    The conditional update locks the conversation: a concurrent turn finds `active_reply_id`
    set. The count of the user's running replies is exact because the user's claims take
    turns: on PostgreSQL a transaction-scoped advisory lock per user (read committed would
    let two claims count the same replies), on SQLite the database's one writer. Both hold
    across any number of instances; the lock lasts until the turn's transaction commits, a
    few milliseconds, and only the same user's turns wait for it.
    """
    await _take_user_turns(session, user_id)
    now = utcnow()
    result = await session.execute(
        _claim,
        {
            "conversation_id": conversation_id,
            "owner": user_id,
            "max_running": max_running,
            "reply_id": reply_id,
            "now": now,
        },
    )
    row = result.first()
    if row is None:
        return None
    # A detached copy of the row for the turn to read: the ORM's own UPDATE .. RETURNING path
    # (matching rows against the session, loading them) cost more than the statement.
    return detached(Conversation, dict(zip(_FIELDS, row, strict=True)))


async def extend_reply(
    session: AsyncSession, conversation_id: uuid.UUID, reply_id: uuid.UUID, positions: int
) -> bool:
    """Claim `positions` more message positions for a running reply's tool calls and results.
    False when the reply no longer holds the conversation (cancelled, swept or deleted)."""
    result = await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.active_reply_id == reply_id)
        .values(message_count=Conversation.message_count + positions)
        .execution_options(synchronize_session=False)
    )
    return changed_rows(result) > 0


async def hold_reply(
    session: AsyncSession, user_id: str, conversation_id: uuid.UUID, reply_id: uuid.UUID
) -> bool:
    """Take the user's turn lock for a running reply's next call (as `claim_reply` does for
    its first), dropping the reply's reservation: a write, which on SQLite is the lock. False
    when the reply no longer holds the conversation."""
    await _take_user_turns(session, user_id)
    result = await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.active_reply_id == reply_id)
        .values(reserved_tokens=0)
        .execution_options(synchronize_session=False)
    )
    return changed_rows(result) > 0


async def release_reply(
    session: AsyncSession, conversation_id: uuid.UUID, reply_id: uuid.UUID
) -> None:
    await session.execute(RELEASE, release_parameters(conversation_id, reply_id))


def release_parameters(conversation_id: uuid.UUID, reply_id: uuid.UUID) -> dict[str, Any]:
    # Named apart from any column: statements that execute with these parameters may update
    # another table, whose columns SQLAlchemy would take them for.
    return {"freed_conversation": conversation_id, "reply_id": reply_id, "now": utcnow()}


async def release_replies(session: AsyncSession, reply_ids: list[uuid.UUID]) -> None:
    await session.execute(
        update(Conversation)
        .where(Conversation.active_reply_id.in_(reply_ids))
        .values(active_reply_id=None, reserved_tokens=0)
    )


_conversations = cast(Table, Conversation.__table__)
_others = _conversations.alias("others")


def _running(
    user_id: str | BindParameter[str],
) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """The user's conversations with a reply under way: what the partial index holds."""
    return _others.c.user_id == user_id, _others.c.active_reply_id.is_not(None)


def running_replies_of(user_id: str | BindParameter[str]) -> Select[int]:
    """How many of the user's conversations have a reply under way: the statement the cap
    counts with, which the partial index answers from those conversations alone."""
    return select(func.count()).select_from(_others).where(*_running(user_id))


_FIELDS = [prop.key for prop in inspect(Conversation).column_attrs]
"""The attributes of a conversation, in the order `_claim` returns their columns."""

# Built once: building a statement costs more CPU than executing it (its cache key is
# memoized on the object, so a statement reused is also looked up in the compiled cache at once).
_claim = (
    # Core columns only: one ORM attribute would send it down the ORM's path again.
    update(_conversations)
    .where(
        _conversations.c.id == bindparam("conversation_id"),
        _conversations.c.user_id == bindparam("owner"),
        _conversations.c.active_reply_id.is_(None),
        running_replies_of(bindparam("owner")).scalar_subquery() < bindparam("max_running"),
    )
    .values(
        active_reply_id=bindparam("reply_id"),
        reserved_tokens=0,
        message_count=_conversations.c.message_count + 2,
        updated_at=bindparam("now"),
        last_message_at=bindparam("now"),
    )
    .returning(*(prop.columns[0] for prop in inspect(Conversation).column_attrs))
)
RELEASE = (
    # A reply's conversation freed, if the reply still holds it (`release_parameters`).
    update(_conversations)
    .where(
        _conversations.c.id == bindparam("freed_conversation"),
        _conversations.c.active_reply_id == bindparam("reply_id"),
    )
    .values(
        active_reply_id=None,
        reserved_tokens=0,
        updated_at=bindparam("now"),
        last_message_at=bindparam("now"),
    )
)


def reserved_by_others(user_id: str, conversation_id: uuid.UUID) -> Select[int]:
    """The tokens the user's other running replies hold against the daily quota, read from
    the same few conversations."""
    return select(func.coalesce(func.sum(_others.c.reserved_tokens), 0)).where(
        *_running(user_id), _others.c.id != conversation_id
    )


async def busy(session: AsyncSession, user_id: str, conversation_id: uuid.UUID) -> bool | None:
    """Whether the user's conversation has a reply under way; None if there is no such one."""
    row = await session.execute(
        select(Conversation.active_reply_id).where(
            Conversation.id == conversation_id, Conversation.user_id == user_id
        )
    )
    found = row.first()
    return None if found is None else found[0] is not None

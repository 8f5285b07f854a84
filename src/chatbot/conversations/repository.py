import uuid
from datetime import datetime

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.conversations.models import Conversation


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


def add(session: AsyncSession, conversation: Conversation) -> None:
    session.add(conversation)


async def delete_owned(session: AsyncSession, user_id: str, conversation_id: uuid.UUID) -> bool:
    result = await session.execute(
        delete(Conversation).where(
            Conversation.id == conversation_id, Conversation.user_id == user_id
        )
    )
    return bool(getattr(result, "rowcount", 0))

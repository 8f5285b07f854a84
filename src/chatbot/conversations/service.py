import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.conversations import repository
from chatbot.conversations.models import Conversation
from chatbot.conversations.schemas import ConversationCreate, ConversationOut, ConversationUpdate
from chatbot.db import utcnow
from chatbot.errors import ConversationNotFound, InvalidCursor
from chatbot.pagination import Page, decode_cursor, encode_cursor
from chatbot.prompts import PromptProfiles
from chatbot.tools.registry import ToolRegistry


async def create(
    session: AsyncSession,
    user_id: str,
    body: ConversationCreate,
    profiles: PromptProfiles,
    tools: ToolRegistry,
    *,
    limit: int,
) -> ConversationOut:
    profiles.check(body.prompt_profile)
    conversation = new_conversation(user_id, body, tools)
    await repository.add_within(session, conversation, limit=limit)
    await session.commit()
    return ConversationOut.of(conversation, tools.toolsets_of(conversation.toolsets))


def new_conversation(user_id: str, body: ConversationCreate, tools: ToolRegistry) -> Conversation:
    tools.check(body.toolsets, user_id)
    now = utcnow()
    return Conversation(
        id=uuid.uuid4(),
        user_id=user_id,
        title=body.title,
        model=body.model,
        system_prompt=body.system_prompt,
        prompt_profile=body.prompt_profile,
        metadata_=body.metadata,
        # None follows CHATBOT_DEFAULT_TOOLSETS, as it is now and as it will be.
        toolsets=body.toolsets,
        message_count=0,
        created_at=now,
        updated_at=now,
    )


async def list_page(
    session: AsyncSession,
    user_id: str,
    *,
    limit: int,
    cursor: str | None,
    tools: ToolRegistry,
) -> Page[ConversationOut]:
    before = _conversation_position(cursor) if cursor else None
    rows = await repository.list_recent(session, user_id, limit=limit + 1, before=before)
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor({"u": last.updated_at.isoformat(), "i": str(last.id)})
    return Page(
        data=[ConversationOut.of(row, tools.toolsets_of(row.toolsets)) for row in rows],
        next_cursor=next_cursor,
    )


def _conversation_position(cursor: str) -> tuple[datetime, uuid.UUID]:
    position = decode_cursor(cursor)
    try:
        updated_at = datetime.fromisoformat(position["u"])
        if updated_at.tzinfo is None:
            raise ValueError("naive time")
        return updated_at.astimezone(UTC), uuid.UUID(position["i"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise InvalidCursor() from None


async def update(
    session: AsyncSession,
    conversation: Conversation,
    body: ConversationUpdate,
    profiles: PromptProfiles,
    tools: ToolRegistry,
) -> ConversationOut:
    changes = body.model_dump(include=body.model_fields_set)
    profiles.check(changes.get("prompt_profile"))
    tools.check(changes.get("toolsets"), conversation.user_id)
    if "metadata" in changes:
        conversation.metadata_ = changes.pop("metadata") or {}
    for field, value in changes.items():
        setattr(conversation, field, value)
    conversation.updated_at = utcnow()
    await session.commit()
    return ConversationOut.of(conversation, tools.toolsets_of(conversation.toolsets))


async def delete(session: AsyncSession, user_id: str, conversation_id: uuid.UUID) -> None:
    if not await repository.delete_owned(session, user_id, conversation_id):
        raise ConversationNotFound()
    await session.commit()

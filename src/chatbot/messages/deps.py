from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.conversations.models import Conversation
from chatbot.errors import message_not_found
from chatbot.ids import parse_id
from chatbot.messages.models import Message


async def get_owned_message(session: AsyncSession, user_id: str, message_id: str) -> Message:
    """The caller's message; somebody else's answers 404 exactly like a missing one."""
    message = await session.scalar(
        select(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.id == parse_id(message_id, message_not_found()),
            Conversation.user_id == user_id,
        )
    )
    if message is None:
        raise message_not_found()
    return message


async def preceding_user_message(session: AsyncSession, message: Message) -> Message | None:
    return await session.scalar(
        select(Message).where(
            Message.conversation_id == message.conversation_id, Message.seq == message.seq - 1
        )
    )

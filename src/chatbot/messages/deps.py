from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.conversations.models import Conversation
from chatbot.errors import MessageNotFound
from chatbot.ids import parse_id
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, Role


async def get_owned_message(session: AsyncSession, user_id: str, message_id: str) -> Message:
    """The caller's message; somebody else's answers 404 exactly like a missing one."""
    message = await session.scalar(
        select(Message)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(
            Message.id == parse_id(message_id, MessageNotFound),
            Conversation.user_id == user_id,
        )
    )
    if message is None:
        raise MessageNotFound()
    return message


async def preceding_user_message(session: AsyncSession, message: Message) -> Message | None:
    """The user message a reply answers (tool calls and results may lie between them)."""
    turn = await messages.turn_of(session, message)
    return turn[0] if turn and turn[0].role is Role.USER else None

from typing import Annotated

from fastapi import Depends

from chatbot.auth.deps import CurrentUser
from chatbot.conversations import repository
from chatbot.conversations.models import Conversation
from chatbot.deps import SessionDep
from chatbot.errors import ConversationNotFound
from chatbot.ids import parse_id


async def owned_conversation(
    conversation_id: str, user_id: CurrentUser, session: SessionDep
) -> Conversation:
    """The caller's conversation; somebody else's answers 404 exactly like a missing one."""
    conversation = await repository.get_owned(
        session, user_id, parse_id(conversation_id, ConversationNotFound)
    )
    if conversation is None:
        raise ConversationNotFound()
    return conversation


OwnedConversation = Annotated[Conversation, Depends(owned_conversation)]

from typing import Annotated

from fastapi import Depends

from chatbot.auth.deps import CurrentUser
from chatbot.conversations import repository
from chatbot.conversations.models import Conversation
from chatbot.deps import SessionDep
from chatbot.errors import conversation_not_found
from chatbot.ids import parse_id


async def owned_conversation(
    conversation_id: str, user_id: CurrentUser, session: SessionDep
) -> Conversation:
    """The caller's conversation; somebody else's answers 404 exactly like a missing one."""
    conversation = await repository.get_owned(
        session, user_id, parse_id(conversation_id, conversation_not_found())
    )
    if conversation is None:
        raise conversation_not_found()
    return conversation


OwnedConversation = Annotated[Conversation, Depends(owned_conversation)]

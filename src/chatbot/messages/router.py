from fastapi import APIRouter

from chatbot.conversations.deps import OwnedConversation
from chatbot.deps import SessionDep
from chatbot.messages import service
from chatbot.messages.schemas import MessageOut
from chatbot.pagination import DEFAULT_LIMIT, Cursor, Limit, Page

router = APIRouter(prefix="/v1/conversations", tags=["messages"])


@router.get("/{conversation_id}/messages")
async def list_messages(
    conversation: OwnedConversation,
    session: SessionDep,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[MessageOut]:
    return await service.list_page(session, conversation, limit=limit, cursor=cursor)

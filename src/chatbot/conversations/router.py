from fastapi import APIRouter, Response, status

from chatbot.auth.deps import CurrentUser
from chatbot.conversations import service
from chatbot.conversations.deps import OwnedConversation
from chatbot.conversations.schemas import ConversationCreate, ConversationOut, ConversationUpdate
from chatbot.deps import SessionDep
from chatbot.pagination import DEFAULT_LIMIT, Cursor, Limit, Page

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_conversation(
    body: ConversationCreate, user_id: CurrentUser, session: SessionDep
) -> ConversationOut:
    return await service.create(session, user_id, body)


@router.get("")
async def list_conversations(
    user_id: CurrentUser,
    session: SessionDep,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[ConversationOut]:
    return await service.list_page(session, user_id, limit=limit, cursor=cursor)


@router.get("/{conversation_id}")
async def get_conversation(conversation: OwnedConversation) -> ConversationOut:
    return ConversationOut.of(conversation)


@router.patch("/{conversation_id}")
async def update_conversation(
    conversation: OwnedConversation, body: ConversationUpdate, session: SessionDep
) -> ConversationOut:
    return await service.update(session, conversation, body)


@router.delete("/{conversation_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_conversation(conversation: OwnedConversation, session: SessionDep) -> Response:
    await service.delete(session, conversation.user_id, conversation.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)

from fastapi import APIRouter, Response, status

from chatbot.auth.deps import CurrentUser
from chatbot.conversations import service
from chatbot.conversations.deps import OwnedConversation
from chatbot.conversations.schemas import ConversationCreate, ConversationOut, ConversationUpdate
from chatbot.deps import ProfilesDep, RepliesDep, SessionDep, SettingsDep, ToolsDep
from chatbot.errors import problem_responses
from chatbot.pagination import DEFAULT_LIMIT, Cursor, Limit, Page
from chatbot.replies.items import StopReason

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=problem_responses({409: "The user has CHATBOT_MAX_CONVERSATIONS already"}),
)
async def create_conversation(
    body: ConversationCreate,
    user_id: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    profiles: ProfilesDep,
    tools: ToolsDep,
) -> ConversationOut:
    return await service.create(
        session, user_id, body, profiles, tools, limit=settings.max_conversations
    )


@router.get("")
async def list_conversations(
    user_id: CurrentUser,
    session: SessionDep,
    tools: ToolsDep,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[ConversationOut]:
    return await service.list_page(session, user_id, limit=limit, cursor=cursor, tools=tools)


@router.get("/{conversation_id}")
async def get_conversation(conversation: OwnedConversation, tools: ToolsDep) -> ConversationOut:
    return ConversationOut.of(conversation, tools.toolsets_of(conversation.toolsets))


@router.patch("/{conversation_id}")
async def update_conversation(
    conversation: OwnedConversation,
    body: ConversationUpdate,
    session: SessionDep,
    profiles: ProfilesDep,
    tools: ToolsDep,
) -> ConversationOut:
    return await service.update(session, conversation, body, profiles, tools)


@router.delete("/{conversation_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_conversation(
    conversation: OwnedConversation, session: SessionDep, replies: RepliesDep
) -> Response:
    running = conversation.active_reply_id
    await service.delete(session, conversation.user_id, conversation.id)
    if running is not None:
        # Nobody is left to read the reply: stop paying for it. Stopped after the delete, it
        # always finds its row gone (a stop first would race the delete to store it).
        await replies.stop(running, StopReason.SUPERSEDED)
    return Response(status_code=status.HTTP_204_NO_CONTENT)

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status

from chatbot.auth.deps import CurrentUser, StreamingUser
from chatbot.chat import idempotency
from chatbot.chat.errors import EventIdOfAnotherConversation
from chatbot.chat.responses import TurnResponses, get_responses
from chatbot.chat.schemas import BackgroundTurnOut, ChatRequest, SendMessage, TurnOut
from chatbot.chat.service import ChatService
from chatbot.deps import RepliesDep, SessionDep, StateDep
from chatbot.errors import ConversationNotFound, problem_responses
from chatbot.ids import parse_id
from chatbot.messages.deps import get_owned_message
from chatbot.messages.models import Role
from chatbot.streams.sse import LastEventId, parse_event_id
from chatbot.validation import ModelName, NonBlankText

router = APIRouter(tags=["chat"])


async def get_chat_service(
    state: StateDep, session: SessionDep, replies: RepliesDep
) -> ChatService:
    return ChatService(state.settings, session, replies, state.llm, state.context, state.tools)


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
ResponsesDep = Annotated[TurnResponses, Depends(get_responses)]
StreamFlag = Annotated[
    bool, Query(description="Answer as Server-Sent Events (same as Accept: text/event-stream)")
]
_IDEMPOTENCY_KEY_DOC = {
    "description": "Makes a retried request safe for 24 h",
    "json_schema_extra": {"pattern": idempotency.KEY_PATTERN, "maxLength": 255},
}
IdempotencyKeyHeader = Annotated[
    str | None, Header(alias="Idempotency-Key", **_IDEMPOTENCY_KEY_DOC)
]
IdempotencyKeyQuery = Annotated[str | None, Query(**_IDEMPOTENCY_KEY_DOC)]

MAX_QUERY_CONTENT = 3_000
"""Characters of a message sent in a URL: percent-encoded, even emoji stay under the 64 KiB that
HTTP servers accept in a request line. Longer messages go in a POST body."""

_REPLY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The reply as Server-Sent Events"},
    202: {"model": BackgroundTurnOut, "description": "Started in the background"},
    **problem_responses(
        {
            409: "A reply is still being generated in this conversation, or (a new one) the "
            "user has CHATBOT_MAX_CONVERSATIONS already",
            413: "The body is larger than the configured limit, or the message (with the system "
            "prompt, summary and tools' definitions) does not fit the model's context",
            429: "Too many requests or replies, a spent daily quota, or a rate-limiting provider",
            502: "The model provider failed",
            503: "The model provider or the database could not be reached",
            504: "The model provider timed out",
        }
    ),
}


@router.post(
    "/v1/conversations/{conversation_id}/messages",
    status_code=status.HTTP_201_CREATED,
    response_model=TurnOut,
    responses=_REPLY_RESPONSES,
)
async def send_message(
    conversation_id: str,
    body: SendMessage,
    request: Request,
    user_id: CurrentUser,
    chat: ChatServiceDep,
    responses: ResponsesDep,
    stream: StreamFlag = False,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    turn = await chat.send(user_id, conversation_id, body, idempotency_key)
    return await responses.respond(
        request, user_id, turn, stream=stream, background=body.background
    )


@router.post(
    "/v1/chat",
    status_code=status.HTTP_201_CREATED,
    response_model=TurnOut,
    responses=_REPLY_RESPONSES,
)
async def chat(
    body: ChatRequest,
    request: Request,
    user_id: CurrentUser,
    chat: ChatServiceDep,
    responses: ResponsesDep,
    stream: StreamFlag = False,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    turn = await chat.chat(user_id, body, idempotency_key)
    return await responses.respond(
        request, user_id, turn, stream=stream, background=body.background
    )


@router.get(
    "/v1/conversations/{conversation_id}/stream",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def send_and_stream(
    conversation_id: str,
    user_id: StreamingUser,
    chat: ChatServiceDep,
    session: SessionDep,
    responses: ResponsesDep,
    content: Annotated[NonBlankText, Query(max_length=MAX_QUERY_CONTENT)],
    model: Annotated[ModelName | None, Query()] = None,
    idempotency_key: IdempotencyKeyQuery = None,
    last_event_id: LastEventId = None,
) -> Response:
    """`new EventSource(url)`: send `content` and stream the reply in one GET.

    When the browser reconnects by itself it sends `Last-Event-ID`: the same reply is resumed
    from there, and the message is never sent again.
    """
    idempotency.validated_key(idempotency_key)
    if last_event_id:
        message_id, offset = parse_event_id(last_event_id)
        message = await get_owned_message(session, user_id, str(message_id))
        same_conversation = message.conversation_id == parse_id(
            conversation_id, ConversationNotFound
        )
        if not same_conversation or message.role is not Role.ASSISTANT:
            raise EventIdOfAnotherConversation()
        return responses.follow(user_id, message.id, offset)
    body = SendMessage(content=content, model=model)
    turn = await chat.send(user_id, conversation_id, body, idempotency_key)
    return responses.stream(user_id, turn)

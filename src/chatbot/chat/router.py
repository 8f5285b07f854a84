from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import JSONResponse

from chatbot.auth.deps import CurrentUser
from chatbot.chat.schemas import ChatRequest, SendMessage, TurnOut
from chatbot.chat.service import ChatService, Turn
from chatbot.chat.sse import stream_response, turn_events
from chatbot.deps import LLMDep, RegistryDep, SessionDep, SessionmakerDep, SettingsDep
from chatbot.errors import PROBLEM_JSON

router = APIRouter(tags=["chat"])


def get_chat_service(
    settings: SettingsDep, sessionmaker: SessionmakerDep, llm: LLMDep, registry: RegistryDep
) -> ChatService:
    return ChatService(settings, sessionmaker, llm, registry)


ChatServiceDep = Annotated[ChatService, Depends(get_chat_service)]
StreamFlag = Annotated[
    bool, Query(description="Answer as Server-Sent Events (same as Accept: text/event-stream)")
]

_REPLY_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The reply as Server-Sent Events"},
    409: {"description": "A reply is still being generated in this conversation"},
    429: {"description": "The model provider is rate limiting"},
    502: {"description": "The model provider failed"},
    503: {"description": "The model provider could not be reached"},
    504: {"description": "The model provider timed out"},
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
    session: SessionDep,
    chat: ChatServiceDep,
    stream: StreamFlag = False,
) -> Response:
    turn = await chat.send(session, user_id, conversation_id, body)
    return await _reply(request, turn, stream)


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
    session: SessionDep,
    chat: ChatServiceDep,
    stream: StreamFlag = False,
) -> Response:
    turn = await chat.chat(session, user_id, body)
    return await _reply(request, turn, stream)


def wants_event_stream(request: Request, stream: bool) -> bool:
    return stream or "text/event-stream" in request.headers.get("accept", "")


async def _reply(request: Request, turn: Turn, stream: bool) -> Response:
    if wants_event_stream(request, stream):
        return stream_response(turn_events(turn))
    outcome = await turn.generation.wait()
    body = {
        "conversation_id": str(turn.conversation_id),
        "user_message": turn.user_message.model_dump(mode="json"),
        "assistant_message": outcome.message,
    }
    if outcome.problem is not None:
        return JSONResponse(
            outcome.problem | body,
            status_code=outcome.problem["status"],
            media_type=PROBLEM_JSON,
            headers=outcome.headers,
        )
    return JSONResponse(body, status_code=status.HTTP_201_CREATED)

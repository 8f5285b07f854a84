from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sse_starlette import EventSourceResponse

from chatbot.auth.deps import AccessTokenQuery, CurrentUser, streaming_user
from chatbot.auth.tokens import TOKEN_PATTERN
from chatbot.deps import RepliesDep, SessionDep, StateDep, StreamSignerDep
from chatbot.errors import MessageNotFound
from chatbot.ids import parse_id
from chatbot.messages.deps import get_owned_message, preceding_user_message
from chatbot.messages.models import Message, Role
from chatbot.messages.schemas import MessageOut
from chatbot.streams.errors import InvalidEventId, NotAReply
from chatbot.streams.sse import (
    LastEventId,
    parse_event_id,
    reply_events,
    start_event,
    stream_response,
    stream_url,
)

router = APIRouter(prefix="/v1/messages", tags=["streams"])

StreamToken = Annotated[
    str | None,
    Query(
        max_length=4096,
        description="The token of a `stream_url`",
        pattern=TOKEN_PATTERN,
    ),
]
StartingAfter = Annotated[
    int | None, Query(ge=0, le=10**12, description="Resume after this many characters")
]


@router.get(
    "/{message_id}/stream",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def follow_message(
    message_id: str,
    request: Request,
    session: SessionDep,
    state: StateDep,
    replies: RepliesDep,
    token: StreamToken = None,
    access_token: AccessTokenQuery = None,
    starting_after: StartingAfter = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """Replay what the reply has so far, then stream the rest live, then `done` or `error`."""
    if token is not None:
        user_id = state.stream_signer.verify(token, parse_id(message_id, MessageNotFound))
        await state.rate_limiter.admit(user_id)
    else:
        user_id = await streaming_user(request, state, access_token)
    message = await _owned_reply(session, user_id, message_id)
    offset = starting_after or 0
    if last_event_id:
        event_message_id, offset = parse_event_id(last_event_id)
        if event_message_id != message.id:
            raise InvalidEventId("Last-Event-ID belongs to another message")
    start = None
    if offset == 0:
        user_message = await preceding_user_message(session, message)
        start = start_event(
            message.conversation_id,
            MessageOut.of(user_message).model_dump(mode="json") if user_message else {},
            MessageOut.of(message).model_dump(mode="json"),
        )
    closed = state.open_streams.open(user_id)
    return stream_response(
        reply_events(message.id, replies.follow(message.id, offset), start), state.settings, closed
    )


@router.post("/{message_id}/stream_url")
async def new_stream_url(
    message_id: str, user_id: CurrentUser, session: SessionDep, signer: StreamSignerDep
) -> dict[str, str]:
    """A fresh `stream_url` for one of the caller's replies, for `EventSource` after a reload."""
    message = await _owned_reply(session, user_id, message_id)
    return {"stream_url": stream_url(signer, user_id, message.id)}


@router.post("/{message_id}/cancel")
async def cancel_message(
    message_id: str, user_id: CurrentUser, session: SessionDep, replies: RepliesDep
) -> dict[str, Any]:
    """Stop a reply at once; the partial text is kept as `cancelled`. Harmless when repeated."""
    message = await get_owned_message(session, user_id, message_id)
    await session.close()  # the cancel may wait for the reply's store: hold no connection
    outcome = await replies.cancel(message, user_id)
    return {"assistant_message": outcome.message}


async def _owned_reply(session: SessionDep, user_id: str, message_id: str) -> Message:
    message = await get_owned_message(session, user_id, message_id)
    if message.role is not Role.ASSISTANT:
        raise NotAReply()
    return message

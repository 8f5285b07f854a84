"""The three ways a turn is answered: SSE, JSON once complete, or 202 with a stream URL."""

import uuid
from collections.abc import AsyncIterator

from fastapi import Request, Response, status
from fastapi.responses import JSONResponse
from sse_starlette import ServerSentEvent

from chatbot.auth.stream_tokens import StreamTokenSigner
from chatbot.chat.schemas import BackgroundTurnOut
from chatbot.chat.service import Turn
from chatbot.config import Settings
from chatbot.deps import RepliesDep, StateDep
from chatbot.errors import PROBLEM_JSON
from chatbot.quotas.service import OpenStreams
from chatbot.replies.items import StopReason
from chatbot.replies.service import Replies
from chatbot.streams.sse import reply_events, start_event, stream_response, stream_url


class TurnResponses:
    def __init__(
        self,
        settings: Settings,
        replies: Replies,
        signer: StreamTokenSigner,
        open_streams: OpenStreams,
    ) -> None:
        self._settings = settings
        self._replies = replies
        self._signer = signer
        self._open_streams = open_streams

    async def respond(
        self, request: Request, user_id: str, turn: Turn, *, stream: bool, background: bool
    ) -> Response:
        if background:
            return self.background(user_id, turn)
        if stream or "text/event-stream" in request.headers.get("accept", ""):
            return self.stream(user_id, turn)
        return await self.json(turn)

    def background(self, user_id: str, turn: Turn) -> Response:
        message_id = turn.assistant_message.id
        body = BackgroundTurnOut(
            conversation_id=turn.conversation_id,
            user_message=turn.user_message,
            assistant_message=turn.assistant_message,
            stream_url=stream_url(self._signer, user_id, message_id),
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED)

    def stream(self, user_id: str, turn: Turn) -> Response:
        message_id = turn.assistant_message.id
        start = start_event(
            turn.conversation_id,
            turn.user_message.model_dump(mode="json"),
            turn.assistant_message.model_dump(mode="json"),
        )
        events = reply_events(message_id, self._replies.follow(message_id), start)
        if self._settings.cancel_on_disconnect and not turn.replayed:
            events = self._cancelled_on_disconnect(turn, events)
        # The turn started: its stream opens whatever else the user has open.
        closed = self._open_streams.open(user_id, refusable=False)
        return stream_response(events, self._settings, closed)

    def follow(self, user_id: str, message_id: uuid.UUID, offset: int) -> Response:
        closed = self._open_streams.open(user_id)
        return stream_response(
            reply_events(message_id, self._replies.follow(message_id, offset)),
            self._settings,
            closed,
        )

    async def json(self, turn: Turn) -> Response:
        outcome = await self._replies.outcome(turn.assistant_message.id)
        body = {
            "conversation_id": str(turn.conversation_id),
            "user_message": turn.user_message.model_dump(mode="json"),
            "assistant_message": outcome.message,
            "tool_calls": outcome.tool_calls,
        }
        if outcome.problem is not None:
            return JSONResponse(
                outcome.problem | body,
                status_code=outcome.problem["status"],
                media_type=PROBLEM_JSON,
                headers=outcome.headers,
            )
        return JSONResponse(body, status_code=status.HTTP_201_CREATED)

    async def _cancelled_on_disconnect(
        self, turn: Turn, events: AsyncIterator[ServerSentEvent | bytes]
    ) -> AsyncIterator[ServerSentEvent | bytes]:
        finished = False
        try:
            async for event in events:
                yield event
                finished = isinstance(event, ServerSentEvent) and event.event in ("done", "error")
        finally:
            if not finished:
                await self._replies.stop(turn.assistant_message.id, StopReason.CANCELLED)


async def get_responses(state: StateDep, replies: RepliesDep) -> TurnResponses:
    return TurnResponses(state.settings, replies, state.stream_signer, state.open_streams)

"""The wire format of a reply stream (see the HTTP contract, "The SSE stream")."""

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from chatbot.chat.service import Turn
from chatbot.streams.registry import Delta, Outcome

PING_SECONDS = 15
# A client that stops reading may hold a reply's events for at most this long.
SEND_TIMEOUT_SECONDS = 30
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def turn_events(turn: Turn) -> AsyncIterator[ServerSentEvent]:
    message_id = turn.assistant_message.id
    yield ServerSentEvent(
        event="start",
        id=f"{message_id}:0",
        data=_json(
            {
                "conversation_id": str(turn.conversation_id),
                "user_message": turn.user_message.model_dump(mode="json"),
                "assistant_message": turn.assistant_message.model_dump(mode="json"),
            }
        ),
    )
    async for item in turn.generation.follow():
        if isinstance(item, Delta):
            yield ServerSentEvent(
                event="delta", id=f"{message_id}:{item.end}", data=_json({"content": item.text})
            )
        else:
            yield outcome_event(item)


def outcome_event(outcome: Outcome) -> ServerSentEvent:
    if outcome.problem is not None:
        return ServerSentEvent(event="error", data=_json(outcome.problem))
    return ServerSentEvent(event="done", data=_json({"assistant_message": outcome.message}))


def stream_response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    return EventSourceResponse(
        events,
        headers=STREAM_HEADERS,
        ping=PING_SECONDS,
        send_timeout=SEND_TIMEOUT_SECONDS,
    )

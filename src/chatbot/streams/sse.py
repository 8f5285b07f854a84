"""The wire format of a reply stream (see the HTTP contract, "The SSE stream")."""

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import orjson
from fastapi import Header
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

from chatbot import json_codec
from chatbot.auth.stream_tokens import StreamTokenSigner
from chatbot.config import Settings
from chatbot.replies.items import Batch, Delta, Item, Outcome
from chatbot.streams.errors import InvalidEventId

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
EVENT_ID_PATTERN = r"^([0-9a-fA-F-]{36}):(\d{1,12})$"
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
LastEventId = Annotated[
    str | None,
    Header(
        max_length=100,
        description="The `id` of the last event received, sent by EventSource on reconnect",
        # Empty counts as absent, as EventSource never sends an empty one.
        json_schema_extra={"pattern": r"^$|" + EVENT_ID_PATTERN},
    ),
]


def _json(data: Any) -> str:
    return json_codec.dumps(data).decode()


def parse_event_id(value: str) -> tuple[uuid.UUID, int]:
    """`<message_id>:<stream position>`, as sent back in `Last-Event-ID`."""
    match = _EVENT_ID.match(value.strip())
    if match is None:
        raise InvalidEventId()
    try:
        return uuid.UUID(match[1]), int(match[2])
    except ValueError:
        raise InvalidEventId() from None


def start_event(
    conversation_id: uuid.UUID, user_message: dict[str, Any], assistant_message: dict[str, Any]
) -> ServerSentEvent:
    return ServerSentEvent(
        event="start",
        id=f"{assistant_message['id']}:0",
        data=_json(
            {
                "conversation_id": str(conversation_id),
                "user_message": user_message,
                "assistant_message": assistant_message,
            }
        ),
    )


def delta_event(event_id_prefix: str, delta: Delta) -> bytes:
    """A delta, encoded by hand: the one event sent hundreds of times per reply. JSON has no
    raw line breaks, so the data fits one line."""
    return (
        (f'id: {event_id_prefix}{delta.end}\r\nevent: delta\r\ndata: {{"content":').encode()
        + orjson.dumps(delta.text)
        + b"}\r\n\r\n"
    )


def _encoded(event_id_prefix: str, item: Item) -> bytes:
    if isinstance(item, Delta):
        return delta_event(event_id_prefix, item)
    return (
        f"id: {event_id_prefix}{item.end}\r\nevent: {item.kind}\r\ndata: {_json(item.data)}\r\n\r\n"
    ).encode()


def done_data(outcome: Outcome) -> dict[str, Any]:
    return {"assistant_message": outcome.message, "tool_calls": outcome.tool_calls}


async def reply_events(
    message_id: uuid.UUID,
    items: AsyncIterator[Batch | Outcome],
    start: ServerSentEvent | None = None,
) -> AsyncIterator[ServerSentEvent | bytes]:
    """Deltas and tool events come as bytes ready for the wire; the others as
    `ServerSentEvent`."""
    if start is not None:
        yield start
    prefix = f"{message_id}:"
    async for item in items:
        if isinstance(item, tuple):
            # Several deltas that were waiting go out in one write, each its own event.
            yield b"".join([_encoded(prefix, each) for each in item])
        elif item.problem is not None:
            yield ServerSentEvent(event="error", data=_json(item.problem))
        else:
            yield ServerSentEvent(event="done", data=_json(done_data(item)))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping")


class _EventSourceResponse(EventSourceResponse):
    """sse-starlette's response with its per-send timeout kept by one timer per stream.

    The library bounds every send with a cancel scope; `asyncio.timeout` was the cheaper way
    (several times cheaper than anyio's), and still a timer armed and cancelled for every delta
    of every stream. Here a send only notes when it began, and one timer per stream, re-armed
    when it fires, cancels a send that has waited `send_timeout` (a client that stopped reading:
    dropped, so it cannot pin memory), as `asyncio.timeout` would have: the task is cancelled and
    the cancellation turned into `SendTimeoutError`."""

    on_close: Callable[[], None] | None = None
    _sending: dict["asyncio.Task[Any]", float]
    _timed_out: set["asyncio.Task[Any]"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._sending = {}
        self._timed_out = set()
        loop = asyncio.get_running_loop()
        watch: asyncio.TimerHandle | None = None

        def check(limit: float) -> None:
            nonlocal watch
            now = loop.time()
            due = now + limit
            for task, began in self._sending.items():
                if now - began < limit:
                    due = min(due, began + limit)
                elif task not in self._timed_out:
                    self._timed_out.add(task)
                    task.cancel()
            watch = loop.call_at(due, check, limit)

        if self.send_timeout is not None:
            watch = loop.call_at(loop.time() + self.send_timeout, check, self.send_timeout)
        try:
            await super().__call__(scope, receive, send)
        finally:
            if watch is not None:
                watch.cancel()
            if self.on_close is not None:
                self.on_close()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._sending[task] = asyncio.get_running_loop().time()
        try:
            await send(message)
        except asyncio.CancelledError:
            # Ours only if no other cancellation came with it (as `asyncio.timeout` decides):
            # a disconnect or a shutdown cancelling the stream meanwhile goes on as itself.
            if task in self._timed_out and task.uncancel() <= cancelling:
                raise SendTimeoutError() from None
            raise
        finally:
            self._sending.pop(task, None)
            self._timed_out.discard(task)


def stream_response(
    events: AsyncIterator[ServerSentEvent | bytes],
    settings: Settings,
    on_close: Callable[[], None] | None = None,
) -> EventSourceResponse:
    """`on_close` is called once the stream ends, however it ends."""
    # The send timeout drops a client that stopped reading, so it cannot pin memory.
    response = _EventSourceResponse(
        events,
        headers=STREAM_HEADERS,
        ping=settings.sse_ping_seconds,
        ping_message_factory=_ping,
        send_timeout=settings.sse_send_timeout,
    )
    response.on_close = on_close
    return response


def stream_url(signer: StreamTokenSigner, user_id: str, message_id: uuid.UUID) -> str:
    """The relative URL a browser opens with `new EventSource(...)` to follow a reply."""
    return f"/v1/messages/{message_id}/stream?token={signer.issue(user_id, message_id)}"

"""The fault suite: every way the model or the client can fail, and what must hold after each.

Each upstream fault runs in both response modes (Server-Sent Events and the JSON fallback). After
every fault the database and the API must agree that the user message is stored exactly once with
its exact content, that every reply row has a final status (the one this fault calls for), that the
conversation takes the next turn, and that the client was told how its reply ended.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from chatbot.messages.models import Message, MessageStatus, Role
from tests.fake_upstream import Reply
from tests.support import (
    Event,
    Service,
    Stored,
    collect_events,
    eventually,
    read_events,
    read_stored,
    streamed_text,
)

FINAL_STATUSES = {
    MessageStatus.COMPLETED,
    MessageStatus.INCOMPLETE,
    MessageStatus.FAILED,
    MessageStatus.CANCELLED,
}
"""Spelled out, so that a status added later is not taken for final without a decision."""

PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}

GOOD = Reply(tokens=["All", " good", " now"])
SPARE = Reply(tokens=["RETRIED"])
"""Queued after a fault that must not be retried: a retry would use it and show."""


# --- the faults -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamFault:
    script: tuple[Reply, ...]
    status: MessageStatus
    content: str
    """What the reply row must hold: the partial text of a reply cut short."""
    code: str | None
    http_status: int
    """The JSON answer's status code, and the `status` of the SSE error event."""
    requests: int
    """Main-model requests the upstream must receive: retries included, and no more."""
    settings: dict[str, Any] = field(default_factory=dict)
    min_seconds: float = 0.0
    """A lower bound on the turn's duration, when the upstream asked us to wait."""
    retry_after: str | None = None
    """The Retry-After the JSON answer must carry."""


UPSTREAM_FAULTS = {
    "5xx-twice": UpstreamFault(
        script=(Reply(status=500), Reply(status=500), SPARE),
        status=MessageStatus.FAILED,
        content="",
        code="upstream_error",
        http_status=502,
        requests=2,
        settings={"upstream_max_retries": 1},
    ),
    "5xx-retry-after-then-ok": UpstreamFault(
        script=(Reply(status=503, headers={"Retry-After": "1"}), GOOD),
        status=MessageStatus.COMPLETED,
        content="All good now",
        code=None,
        http_status=201,
        requests=2,
        settings={"upstream_max_retries": 1},
        min_seconds=0.9,
    ),
    "429-retry-after-then-ok": UpstreamFault(
        script=(Reply(status=429, headers={"Retry-After": "1"}), GOOD),
        status=MessageStatus.COMPLETED,
        content="All good now",
        code=None,
        http_status=201,
        requests=2,
        settings={"upstream_max_retries": 1},
        min_seconds=0.9,
    ),
    "429-no-retries-left": UpstreamFault(
        script=(Reply(status=429, headers={"Retry-After": "7"}),),
        status=MessageStatus.FAILED,
        content="",
        code="upstream_rate_limited",
        http_status=429,
        requests=1,
        settings={"upstream_max_retries": 0},
        retry_after="7",
    ),
    "hang-before-first-token": UpstreamFault(
        script=(Reply(first_token_delay=60),),
        status=MessageStatus.FAILED,
        content="",
        code="upstream_timeout",
        http_status=504,
        requests=1,
        settings={"upstream_timeout": 0.5, "upstream_max_retries": 0},
    ),
    "hang-mid-stream": UpstreamFault(
        script=(Reply(tokens=["Par", "tial", " never"], hang_after=2), SPARE),
        status=MessageStatus.INCOMPLETE,
        content="Partial",
        code="upstream_timeout",
        http_status=504,
        requests=1,
        settings={"upstream_timeout": 0.5, "upstream_max_retries": 2},
    ),
    "drop-mid-stream": UpstreamFault(
        script=(Reply(tokens=["Half", " a", " reply"], drop_after=2), SPARE),
        status=MessageStatus.INCOMPLETE,
        content="Half a",
        code="upstream_disconnected",
        http_status=502,
        requests=1,
        settings={"upstream_max_retries": 2},
    ),
    "empty-twice": UpstreamFault(
        script=(Reply(tokens=[]), Reply(tokens=[]), SPARE),
        status=MessageStatus.FAILED,
        content="",
        code="empty_reply",
        http_status=502,
        requests=2,
        settings={"upstream_max_retries": 2},
    ),
    "empty-then-ok": UpstreamFault(
        script=(Reply(tokens=[]), GOOD, SPARE),
        status=MessageStatus.COMPLETED,
        content="All good now",
        code=None,
        http_status=201,
        requests=2,
    ),
    "garbage-before-first-token": UpstreamFault(
        script=(Reply(tokens=["Never", " seen"], garbage_after=0),),
        status=MessageStatus.FAILED,
        content="",
        code="upstream_error",
        http_status=502,
        requests=1,
        settings={"upstream_max_retries": 0},
    ),
    "garbage-mid-stream": UpstreamFault(
        script=(Reply(tokens=["Fine", " then"], garbage_after=1), SPARE),
        status=MessageStatus.INCOMPLETE,
        content="Fine",
        code="upstream_error",
        http_status=502,
        requests=1,
        settings={"upstream_max_retries": 2},
    ),
}


# --- what must hold after every fault ---------------------------------------------------------


async def assert_settled(
    service: Service, conversation_id: str, sent: list[str], *, seconds: float = 5.0
) -> Stored:
    """Once no reply runs: each message sent is stored once, exactly, and answered by one reply
    row with a final status; the conversation is free; the API shows what the database holds."""
    await eventually(lambda: not service.state.replies.registry.running(), seconds)
    stored = await read_stored(service.settings.database_url, conversation_id)

    assert [row.role for row in stored.rows] == [Role.USER, Role.ASSISTANT] * len(sent)
    assert [row.content for row in stored.rows if row.role is Role.USER] == sent
    assert all(row.status is MessageStatus.COMPLETED for row in stored.rows[::2])
    not_final = [(row.id, row.status) for row in stored.replies if row.status not in FINAL_STATUSES]
    assert not not_final, f"replies left without a final status: {not_final}"
    assert all(row.completed_at is not None for row in stored.replies)
    assert stored.conversation.active_reply_id is None
    assert stored.conversation.message_count == len(stored.rows)

    listed = await service.messages(conversation_id)
    assert [(item["id"], item["role"], item["status"], item["content"]) for item in listed] == [
        (str(row.id), row.role.value, row.status.value, row.content) for row in stored.rows
    ]
    return stored


async def assert_takes_the_next_turn(
    service: Service, conversation_id: str, sent: list[str]
) -> None:
    """The fault left nothing behind: the next message is answered in full."""
    service.upstream.script.clear()
    service.upstream.queue(Reply(tokens=["Next", " turn"]))
    follow_up = "And now? (after the fault)"
    response = await service.send(conversation_id, follow_up)
    assert response.status_code == 201, response.text
    assert response.json()["assistant_message"]["status"] == "completed"
    stored = await assert_settled(service, conversation_id, [*sent, follow_up])
    assert stored.replies[-1].status is MessageStatus.COMPLETED
    assert stored.replies[-1].content == "Next turn"


def assert_problem(document: dict[str, Any], *, status: int, code: str) -> None:
    assert document.keys() >= PROBLEM_FIELDS, document
    assert document["status"] == status
    assert document["code"] == code
    assert isinstance(document["title"], str)
    assert document["title"]
    assert isinstance(document["detail"], str)
    assert document["detail"]
    assert "sk-test-key" not in json.dumps(document)


def assert_reply_row(row: Message, fault: UpstreamFault) -> None:
    assert row.status is fault.status
    assert row.content == fault.content
    assert row.latency_ms is not None
    if fault.code is None:
        assert row.error is None
        assert row.finish_reason == "stop"
    else:
        assert row.error is not None
        assert row.error["code"] == fault.code
        assert row.error["status"] == fault.http_status


def assert_one_ending(events: list[Event], message_id: str) -> Event:
    """A stream opens with `start`, then deltas whose ids count the characters, then one end."""
    assert events[0].event == "start"
    assert events[0].id == f"{message_id}:0"
    *middle, last = events[1:]
    assert [event.event for event in middle] == ["delta"] * len(middle)
    delivered = 0
    for event in middle:
        delivered += len(event.data["content"])
        assert event.id == f"{message_id}:{delivered}"
    assert last.event in ("done", "error")
    return last


# --- upstream faults --------------------------------------------------------------------------


async def _send_streaming(
    service: Service, conversation_id: str, content: str, fault: UpstreamFault
) -> str:
    async with service.client.stream(
        "POST",
        f"/v1/conversations/{conversation_id}/messages",
        json={"content": content},
        headers={**service.auth(), "Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await collect_events(response)

    start = events[0].data
    message_id = start["assistant_message"]["id"]
    assert start["conversation_id"] == conversation_id
    assert start["user_message"]["content"] == content
    assert start["assistant_message"]["status"] == "in_progress"
    last = assert_one_ending(events, message_id)
    # Every character once: nothing repeated by a retry, nothing lost.
    assert streamed_text(events) == fault.content
    if fault.code is None:
        assert last.event == "done", last.data
        assert last.data["assistant_message"]["id"] == message_id
        assert last.data["assistant_message"]["status"] == "completed"
        assert last.data["assistant_message"]["content"] == fault.content
    else:
        assert last.event == "error", last.data
        assert_problem(last.data, status=fault.http_status, code=fault.code)
        assert last.data["assistant_message_id"] == message_id
    return str(message_id)


async def _send_json(
    service: Service, conversation_id: str, content: str, fault: UpstreamFault
) -> str:
    response = await service.send(conversation_id, content)
    assert response.status_code == fault.http_status, response.text
    body = response.json()
    assert body["conversation_id"] == conversation_id
    assert body["user_message"]["content"] == content
    reply = body["assistant_message"]
    assert reply["status"] == fault.status.value
    assert reply["content"] == fault.content
    if fault.code is None:
        assert response.headers["content-type"] == "application/json"
    else:
        assert response.headers["content-type"] == "application/problem+json"
        assert_problem(body, status=fault.http_status, code=fault.code)
    if fault.retry_after is not None:
        assert response.headers["retry-after"] == fault.retry_after
    return str(reply["id"])


@pytest.mark.parametrize("mode", ["sse", "json"])
@pytest.mark.parametrize("fault_name", list(UPSTREAM_FAULTS))
async def test_upstream_fault(start_service: Any, fault_name: str, mode: str) -> None:
    fault = UPSTREAM_FAULTS[fault_name]
    async with start_service(**fault.settings) as service:
        conversation_id = (await service.create_conversation())["id"]
        content = f"Fault {fault_name} over {mode}:\nare you still there? ✓"
        service.upstream.queue(*fault.script)

        started = time.monotonic()
        send = _send_streaming if mode == "sse" else _send_json
        message_id = await send(service, conversation_id, content, fault)
        assert time.monotonic() - started >= fault.min_seconds

        # The client was told the end only once it was stored.
        listed = await service.messages(conversation_id)
        assert [(item["id"], item["status"]) for item in listed[1:]] == [
            (message_id, fault.status.value)
        ]
        stored = await assert_settled(service, conversation_id, [content])
        assert str(stored.replies[0].id) == message_id
        assert_reply_row(stored.replies[0], fault)
        assert len(service.upstream.requests) == fault.requests
        await assert_takes_the_next_turn(service, conversation_id, [content])


# --- client faults ----------------------------------------------------------------------------

TOKENS = ["Still", " here", " after", " you", " left"]


@pytest.mark.parametrize(
    "cancel_on_disconnect", [False, True], ids=["default", "cancel_on_disconnect"]
)
async def test_client_disconnecting_mid_stream(
    start_service: Any, cancel_on_disconnect: bool
) -> None:
    """By default the reply outlives its client; `cancel_on_disconnect` stops it instead, which
    also proves the service did see this client go before the rest of the reply came."""
    settings = {"cancel_on_disconnect": True} if cancel_on_disconnect else {}
    async with start_service(**settings) as service:
        conversation_id = (await service.create_conversation())["id"]
        content = "Tell me something, I may not stay"
        gate = asyncio.Event()
        # A pause between tokens also lets the fake upstream settle its watch on the connection.
        service.upstream.queue(Reply(tokens=TOKENS, gate=gate, token_delay=0.01), SPARE)

        async with (
            httpx.AsyncClient(base_url=service.url, timeout=10) as impatient,
            impatient.stream(
                "POST",
                f"/v1/conversations/{conversation_id}/messages",
                json={"content": content},
                headers={**service.auth(), "Accept": "text/event-stream"},
            ) as response,
        ):
            events = read_events(response)
            start = await anext(events)
            first = await anext(events)
            assert first.event == "delta"
            assert first.data == {"content": "Still"}
        # The connection is closed while the upstream still holds the rest of the reply.
        message_id = start.data["assistant_message"]["id"]
        registry = service.state.replies.registry
        if cancel_on_disconnect:
            await eventually(lambda: not registry.running())
        else:
            await asyncio.sleep(0.3)
            assert registry.get(uuid.UUID(message_id)) is not None
        gate.set()

        stored = await assert_settled(service, conversation_id, [content])
        reply = stored.replies[0]
        assert str(reply.id) == message_id
        assert len(service.upstream.requests) == 1
        if cancel_on_disconnect:
            assert reply.status is MessageStatus.CANCELLED
            assert reply.content == "Still"
            await eventually(lambda: service.upstream.disconnects == 1)
        else:
            assert reply.status is MessageStatus.COMPLETED
            assert reply.content == "".join(TOKENS)
            assert service.upstream.disconnects == 0

        # Coming back, the client gets the whole reply, once, and how it ended.
        replayed = await service.follow(message_id)
        assert replayed[0].data["user_message"]["content"] == content
        last = assert_one_ending(replayed, message_id)
        assert last.event == "done"
        assert last.data["assistant_message"]["status"] == reply.status.value
        assert streamed_text(replayed) == reply.content
        await assert_takes_the_next_turn(service, conversation_id, [content])


async def test_client_that_stops_reading_is_dropped_and_the_reply_goes_on(
    start_service: Any,
) -> None:
    # A reply of ~13 MB, far past what socket buffers hold (and CHATBOT_MAX_REPLY_CHARS).
    async with start_service(sse_send_timeout=0.5, max_reply_chars=20_000_000) as service:
        conversation_id = (await service.create_conversation())["id"]
        content = "Flood me, I will not read"
        big = ["lorem ipsum " * 5_461] * 200  # ~13 MB: far more than socket buffers hold
        service.upstream.queue(Reply(tokens=big))
        host, port = service.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"content": content}).encode()
        writer.write(
            f"POST /v1/conversations/{conversation_id}/messages HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: {service.auth()['Authorization']}\r\n"
            "Accept: text/event-stream\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        try:
            # Nothing is read while the reply is generated and stored.
            await eventually(lambda: len(service.upstream.requests) == 1)
            stored = await assert_settled(service, conversation_id, [content], seconds=20)
            assert stored.replies[0].status is MessageStatus.COMPLETED
            assert stored.replies[0].content == "".join(big)
            await asyncio.sleep(1.0)  # well past the send timeout

            received = 0
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
                received += len(chunk)
        finally:
            writer.close()
        # The service hung up on this client before it had sent it the whole reply.
        assert 0 < received < len("".join(big))
        await assert_takes_the_next_turn(service, conversation_id, [content])

"""A chat turn streamed over a real socket, and its JSON fallback."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sse_starlette import EventSourceResponse, ServerSentEvent

from chatbot.config import Settings
from chatbot.replies.bus import InProcessBus, MemoryChannel
from chatbot.replies.items import Delta, Outcome
from chatbot.replies.live import LiveReply, ReplyRef
from chatbot.replies.registry import ReplyRegistry
from chatbot.streams import sse
from chatbot.streams.sse import delta_event, reply_events
from tests.fake_upstream import Reply
from tests.support import Service, collect_events, final_reply, read_events


async def test_deltas_arrive_before_the_upstream_has_finished(service: Service) -> None:
    conversation = await service.create_conversation()
    gate = asyncio.Event()
    service.upstream.queue(Reply(tokens=["Once", " upon", " a", " time"], gate=gate))

    async with service.client.stream(
        "POST",
        f"/v1/conversations/{conversation['id']}/messages",
        json={"content": "Tell me a story"},
        headers={**service.auth(), "Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        events = read_events(response)
        start = await anext(events)
        assert start.event == "start"
        first = await asyncio.wait_for(anext(events), 5)
        # The upstream is still holding the rest of the reply behind the gate.
        assert first.event == "delta"
        assert first.data == {"content": "Once"}
        assert not gate.is_set()
        gate.set()
        rest = [event async for event in events]

    deltas = [first, *[event for event in rest if event.event == "delta"]]
    assert [event.data["content"] for event in deltas] == ["Once", " upon", " a", " time"]
    assert rest[-1].event == "done"


async def test_stored_reply_equals_the_streamed_deltas(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=["Bon", "jour", " à", " vous", " 👋"], token_delay=0.01))

    async with service.client.stream(
        "POST",
        f"/v1/conversations/{conversation['id']}/messages?stream=true",
        json={"content": "Say hello in French"},
        headers=service.auth(),
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-request-id"]
        events = await collect_events(response)

    start, *deltas, done = events
    assert [event.event for event in deltas] == ["delta"] * 5
    message_id = start.data["assistant_message"]["id"]
    assert start.id == f"{message_id}:0"
    assert start.data["assistant_message"]["status"] == "in_progress"
    streamed = "".join(event.data["content"] for event in deltas)
    assert deltas[-1].id == f"{message_id}:{len(streamed)}"

    stored = (await service.messages(conversation["id"]))[-1]
    assert done.event == "done"
    assert done.data["assistant_message"] == stored
    assert stored["id"] == message_id
    assert stored["content"] == streamed == "Bonjour à vous 👋"
    assert stored["status"] == "completed"
    assert stored["finish_reason"] == "stop"
    assert stored["model"] == "fake-model"
    assert stored["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "total_tokens": 16,
        "estimated": False,
    }
    assert 0 <= stored["ttft_ms"] <= stored["latency_ms"]
    # Five tokens 10 ms apart cannot arrive in less than 40 ms.
    assert stored["latency_ms"] >= 40


async def test_json_fallback_returns_the_stored_messages(service: Service) -> None:
    conversation = await service.create_conversation()
    response = await service.send(conversation["id"], "Hi")
    assert response.status_code == 201
    body = response.json()
    stored = await service.messages(conversation["id"])
    assert [message["role"] for message in stored] == ["user", "assistant"]
    assert body == {
        "conversation_id": conversation["id"],
        "user_message": stored[0],
        "assistant_message": stored[1],
        "tool_calls": [],
    }
    assert stored[1]["content"] == "Hello, world!"
    conversation_now = (
        await service.client.get(f"/v1/conversations/{conversation['id']}", headers=service.auth())
    ).json()
    assert conversation_now["message_count"] == 2
    assert conversation_now["last_message_at"] is not None


async def test_upstream_receives_system_prompt_history_and_parameters(service: Service) -> None:
    conversation = await service.create_conversation(system_prompt="You are terse.")
    for content in ("First question", "Second question"):
        response = await service.send(
            conversation["id"], content, temperature=0.3, max_output_tokens=50
        )
        assert response.status_code == 201

    sent = service.upstream.requests[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "Hello, world!"},
        {"role": "user", "content": "Second question"},
    ]
    assert sent["model"] == "gpt-4o-mini"
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0.3
    assert sent["max_tokens"] == 50


async def test_history_is_bounded(start_service: Any) -> None:
    async with start_service(history_messages=2) as service:
        conversation = await service.create_conversation()
        for index in range(3):
            response = await service.send(conversation["id"], f"question {index}")
            assert response.status_code == 201
            await service.state.chores.idle()
        sent = service.upstream.requests[-1].body["messages"]
        # What no longer fits travels as the summary, right after the system prompt.
        assert sent[1]["content"].startswith("Summary of the earlier part")
        assert [message["content"] for message in sent[2:]] == [
            "question 1",
            "Hello, world!",
            "question 2",
        ]


async def test_one_call_chat_creates_the_conversation(service: Service) -> None:
    events = await service.stream_chat("Hello there", title="Greetings", metadata={"app": "test"})
    assert events[0].event == "start"
    assert events[-1].event == "done"
    conversation_id = events[0].data["conversation_id"]

    conversation = (
        await service.client.get(f"/v1/conversations/{conversation_id}", headers=service.auth())
    ).json()
    assert conversation["title"] == "Greetings"
    assert conversation["metadata"] == {"app": "test"}
    assert conversation["message_count"] == 2

    follow_up = await service.client.post(
        "/v1/chat",
        json={"message": "And again", "conversation_id": conversation_id},
        headers=service.auth(),
    )
    assert follow_up.status_code == 201
    assert follow_up.json()["conversation_id"] == conversation_id
    assert len(await service.messages(conversation_id)) == 4


async def test_second_turn_during_a_reply_is_409(service: Service) -> None:
    conversation = await service.create_conversation()
    gate = asyncio.Event()
    service.upstream.queue(Reply(gate=gate))
    url = f"/v1/conversations/{conversation['id']}/messages"

    async with service.client.stream(
        "POST",
        url,
        json={"content": "one"},
        headers={**service.auth(), "Accept": "text/event-stream"},
    ) as response:
        events = read_events(response)
        await anext(events)
        await anext(events)
        second = await service.send(conversation["id"], "two")
        assert second.status_code == 409
        assert second.headers["content-type"] == "application/problem+json"
        assert second.json()["code"] == "reply_in_progress"
        gate.set()
        [event async for event in events]

    # Once the reply is stored the conversation takes turns again, and "two" was never stored.
    third = await service.send(conversation["id"], "three")
    assert third.status_code == 201
    contents = [message["content"] for message in await service.messages(conversation["id"])]
    assert contents == ["one", "Hello, world!", "three", "Hello, world!"]


async def test_concurrent_turns_race_for_one_slot(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.default = Reply(first_token_delay=0.2)

    async def send(index: int) -> int:
        response = await service.send(conversation["id"], f"m{index}")
        return response.status_code

    statuses = await asyncio.gather(*(send(index) for index in range(5)))
    assert sorted(statuses) == [201, 409, 409, 409, 409]
    assert len(await service.messages(conversation["id"])) == 2


async def test_reply_is_stored_when_the_client_disconnects(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=["a", "b", "c", "d", "e"], token_delay=0.05))

    async with (
        httpx.AsyncClient(base_url=service.url) as impatient,
        impatient.stream(
            "POST",
            f"/v1/conversations/{conversation['id']}/messages?stream=true",
            json={"content": "go"},
            headers=service.auth(),
        ) as response,
    ):
        events = read_events(response)
        await anext(events)
        await anext(events)
        # Leaving the block closes the connection mid-reply.

    reply = await final_reply(service, conversation["id"])
    assert reply["status"] == "completed"
    assert reply["content"] == "abcde"


@pytest.mark.parametrize(
    "text", ["plain", 'quotes " and \\ backslash', "line\nbreaks\r\nand\rreturns", "\u2028 é 🙂"]
)
def test_a_hand_encoded_delta_is_the_event_sse_starlette_would_send(text: str) -> None:
    expected = ServerSentEvent(
        event="delta",
        id="m:7",
        data=json.dumps({"content": text}, ensure_ascii=False, separators=(",", ":")),
    ).encode()
    assert delta_event("m:", Delta(text, 7)) == expected


def _live_reply(
    message_id: uuid.UUID,
) -> tuple[LiveReply, Callable[..., AsyncIterator[Any]]]:
    """A reply on an in-process bus, and a way to follow it from a position."""
    bus = InProcessBus()
    reply = ReplyRegistry(bus).open(ReplyRef(message_id, uuid.uuid4(), "alice"), seq=2)

    def follow(after: int = 0) -> AsyncIterator[Any]:
        items = bus.follow(message_id, after)
        assert items is not None
        return items

    return reply, follow


async def test_deltas_that_waited_for_a_busy_follower_go_out_in_one_write() -> None:
    # A follower that fell behind catches up with one send, not one per delta; every delta is
    # still its own event, with its own id, in order.
    message_id = uuid.uuid4()
    generation, follow = _live_reply(message_id)
    for piece in ("Once", " upon", " a"):
        generation.append(piece)
    events = reply_events(message_id, follow())
    first = await anext(events)
    assert first == b"".join(
        delta_event(f"{message_id}:", delta)
        for delta in (Delta("Once", 4), Delta(" upon", 9), Delta(" a", 11))
    )
    generation.append(" time")
    assert await anext(events) == delta_event(f"{message_id}:", Delta(" time", 16))
    generation.finish(Outcome(message={"id": str(message_id), "content": "Once upon a time"}))
    done = await anext(events)
    assert isinstance(done, ServerSentEvent)
    assert done.event == "done"


async def test_a_reply_that_ends_while_a_batch_is_sent_loses_none_of_its_end() -> None:
    # The follower is busy sending "Hello" when the rest arrives and the reply ends: it must
    # still send ", world" before done.
    message_id = uuid.uuid4()
    generation, follow = _live_reply(message_id)
    generation.append("Hello")
    items = follow()
    assert await anext(items) == (Delta("Hello", 5),)
    generation.append(", world")
    generation.finish(Outcome(message={"id": str(message_id)}))
    rest = [item async for item in items]
    assert rest == [(Delta(", world", 12),), Outcome(message={"id": str(message_id)})]


async def test_followers_that_leave_while_waiting_leave_nothing_behind() -> None:
    # Clients that come and go during a long silence (a slow model, a tool call) must not
    # pile up waiters on the reply; the one that stays still wakes.
    message_id = uuid.uuid4()
    generation, follow = _live_reply(message_id)
    staying = asyncio.ensure_future(anext(follow()))
    leaving = [asyncio.ensure_future(anext(follow())) for _ in range(50)]
    await asyncio.sleep(0)
    channel = generation._channel
    assert isinstance(channel, MemoryChannel)
    assert len(channel._waiting) == 51
    for task in leaving:
        task.cancel()
    await asyncio.gather(*leaving, return_exceptions=True)
    assert len(channel._waiting) == 1
    generation.append("Hello")
    assert await asyncio.wait_for(staying, 1) == (Delta("Hello", 5),)
    assert channel._waiting == []


async def test_sse_starlette_still_sends_through_the_method_we_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`stream_response` replaces sse-starlette's private `_send_with_timeout` (a native
    timeout per send): should the library stop sending through it, the override would
    silently do nothing. This fails first."""
    assert "_send_with_timeout" in vars(EventSourceResponse)
    sent: list[str] = []
    override = sse._EventSourceResponse._send_with_timeout

    async def counted(self: Any, send: Any, message: Any) -> None:
        sent.append(message["type"])
        await override(self, send, message)

    monkeypatch.setattr(sse._EventSourceResponse, "_send_with_timeout", counted)

    async def events() -> AsyncIterator[ServerSentEvent | bytes]:
        yield ServerSentEvent(event="start", data="{}")
        yield b"event: delta\r\ndata: {}\r\n\r\n"

    received: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        received.append(message)

    async def receive() -> Any:
        await asyncio.Event().wait()

    response = sse.stream_response(events(), Settings(_env_file=None))
    await response({"type": "http", "method": "GET", "headers": []}, receive, send)
    assert sent.count("http.response.body") >= 2
    assert b"event: delta" in b"".join(m.get("body", b"") for m in received)


async def test_a_follower_ahead_of_the_reply_gets_only_what_lies_past_its_position() -> None:
    # A client resuming past what the reply has said so far (a position from another try)
    # gets nothing until the reply passes it, and never an empty delta.
    message_id = uuid.uuid4()
    generation, follow = _live_reply(message_id)
    generation.append("Hi")
    bus_items = follow(5)
    generation.append("abc")  # ends at 5: all of it lies before the follower's position
    generation.append("de")
    assert await anext(bus_items) == (Delta("de", 7),)

"""Replies that survive the network: resume, follow, background, EventSource, idempotency."""

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.fake_upstream import Reply
from tests.support import (
    Event,
    Service,
    collect_events,
    final_reply,
    read_events,
    streamed_text,
)

TOKENS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog."]


async def _start_streaming(
    service: Service, conversation_id: str, client: httpx.AsyncClient, count: int
) -> tuple[str, list[Event]]:
    """Send a message over SSE, read `count` events, then drop the connection."""
    received: list[Event] = []
    async with client.stream(
        "POST",
        f"/v1/conversations/{conversation_id}/messages?stream=true",
        json={"content": "Tell me about the fox"},
        headers=service.auth(),
    ) as response:
        events = read_events(response)
        for _ in range(count):
            received.append(await anext(events))
    return received[0].data["assistant_message"]["id"], received


async def test_reconnect_with_last_event_id_receives_exactly_the_rest(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=TOKENS, token_delay=0.05))
    async with httpx.AsyncClient(base_url=service.url) as phone:
        message_id, before = await _start_streaming(service, conversation["id"], phone, 4)
    assert [event.event for event in before] == ["start", "delta", "delta", "delta"]
    last_id = before[-1].id
    assert last_id is not None

    async with service.client.stream(
        "GET",
        f"/v1/messages/{message_id}/stream",
        headers={**service.auth(), "Last-Event-ID": last_id},
    ) as response:
        assert response.status_code == 200
        after = await collect_events(response)

    assert after[0].event == "delta"  # no second start: the client already has it
    assert after[-1].event == "done"
    joined = streamed_text([*before, *after])
    stored = after[-1].data["assistant_message"]
    assert joined == stored["content"] == "".join(TOKENS)
    assert (await service.messages(conversation["id"]))[-1] == stored
    assert len(service.upstream.requests) == 1


async def test_starting_after_replays_a_completed_reply_from_the_database(
    service: Service,
) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=TOKENS))
    sent = await service.send(conversation["id"], "fox")
    message_id = sent.json()["assistant_message"]["id"]
    async with service.client.stream(
        "GET", f"/v1/messages/{message_id}/stream?starting_after=10", headers=service.auth()
    ) as response:
        events = await collect_events(response)
    assert [event.event for event in events] == ["delta", "done"]
    assert events[0].data["content"] == "".join(TOKENS)[10:]
    assert events[0].id == f"{message_id}:{len(''.join(TOKENS))}"

    async with service.client.stream(
        "GET", f"/v1/messages/{message_id}/stream", headers=service.auth()
    ) as response:
        full = await collect_events(response)
    assert [event.event for event in full] == ["start", "delta", "done"]
    assert full[0].data["user_message"]["content"] == "fox"
    assert len(service.upstream.requests) == 1


async def test_several_clients_follow_one_reply(service: Service) -> None:
    conversation = await service.create_conversation()
    gate = asyncio.Event()
    service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
    response = await service.send(conversation["id"], "fox", background=True)
    message_id = response.json()["assistant_message"]["id"]

    async def follow() -> str:
        events = await service.follow(message_id)
        assert events[-1].event == "done"
        return streamed_text(events)

    followers = [asyncio.create_task(follow()) for _ in range(3)]
    await asyncio.sleep(0.2)
    gate.set()
    assert await asyncio.gather(*followers) == ["".join(TOKENS)] * 3
    assert len(service.upstream.requests) == 1


async def test_a_reply_whose_client_vanished_is_stored_complete(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=TOKENS, token_delay=0.03))
    async with httpx.AsyncClient(base_url=service.url) as phone:
        await _start_streaming(service, conversation["id"], phone, 2)
    reply = await final_reply(service, conversation["id"])
    assert reply["status"] == "completed"
    assert reply["content"] == "".join(TOKENS)


async def test_background_answers_202_with_a_stream_url_that_needs_no_header(
    service: Service,
) -> None:
    conversation = await service.create_conversation()
    response = await service.send(conversation["id"], "in the background", background=True)
    assert response.status_code == 202
    body = response.json()
    assert body["assistant_message"]["status"] == "in_progress"
    stream_url = body["stream_url"]
    assert stream_url.startswith(f"/v1/messages/{body['assistant_message']['id']}/stream?token=")

    async with service.client.stream("GET", stream_url) as stream:  # no Authorization header
        assert stream.status_code == 200
        events = await collect_events(stream)
    assert events[0].event == "start"
    assert events[-1].data["assistant_message"]["content"] == "Hello, world!"


async def test_stream_tokens_are_bound_to_one_message_and_are_not_access_tokens(
    service: Service,
) -> None:
    conversation = await service.create_conversation()
    first = (await service.send(conversation["id"], "one", background=True)).json()
    await final_reply(service, conversation["id"])
    second = (await service.send(conversation["id"], "two", background=True)).json()
    token = first["stream_url"].split("token=")[1]
    other_message = second["assistant_message"]["id"]
    reused = await service.client.get(f"/v1/messages/{other_message}/stream?token={token}")
    assert reused.status_code == 401
    as_bearer = await service.client.get(
        "/v1/conversations", headers={"Authorization": f"Bearer {token}"}
    )
    assert as_bearer.status_code == 401
    forged = await service.client.get(f"/v1/messages/{other_message}/stream?token=abc.def.ghi")
    assert forged.status_code == 401


async def test_stream_tokens_expire(start_service: Any) -> None:
    async with start_service(stream_token_ttl=1) as service:
        conversation = await service.create_conversation()
        body = (await service.send(conversation["id"], "one", background=True)).json()
        await asyncio.sleep(2.1)
        expired = await service.client.get(body["stream_url"])
        assert expired.status_code == 401
        assert expired.json()["code"] == "token_expired"


async def test_following_somebody_elses_reply_is_404(service: Service) -> None:
    conversation = await service.create_conversation("alice")
    body = (await service.send(conversation["id"], "mine", user="alice")).json()
    message_id = body["assistant_message"]["id"]
    for method, path in (("GET", "stream"), ("POST", "cancel")):
        response = await service.client.request(
            method, f"/v1/messages/{message_id}/{path}", headers=service.auth("mallory")
        )
        assert response.status_code == 404
        assert response.json()["code"] == "message_not_found"


async def test_one_get_eventsource_resumes_and_never_sends_twice(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=TOKENS, token_delay=0.05))
    url = f"/v1/conversations/{conversation['id']}/stream"
    params = {"content": "Hello from EventSource", "access_token": _access_token(service)}
    async with httpx.AsyncClient(base_url=service.url) as browser:
        async with browser.stream("GET", url, params=params) as response:
            assert response.status_code == 200
            events = read_events(response)
            before = [await anext(events) for _ in range(3)]
        # The browser reconnects to the same URL by itself, with Last-Event-ID.
        async with browser.stream(
            "GET", url, params=params, headers={"Last-Event-ID": before[-1].id or ""}
        ) as response:
            after = await collect_events(response)
    joined = streamed_text([*before, *after])
    assert joined == "".join(TOKENS)
    assert after[-1].event == "done"
    contents = [message["content"] for message in await service.messages(conversation["id"])]
    assert contents == ["Hello from EventSource", "".join(TOKENS)]
    assert len(service.upstream.requests) == 1


def _access_token(service: Service) -> str:
    return service.auth()["Authorization"].removeprefix("Bearer ")


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_a_repeated_post_with_the_same_idempotency_key_creates_nothing(
    service: Service, mode: str
) -> None:
    conversation = await service.create_conversation()
    url = f"/v1/conversations/{conversation['id']}/messages"
    headers = {**service.auth(), "Idempotency-Key": "retry-1"}
    if mode == "sse":
        headers["Accept"] = "text/event-stream"

    async def send() -> tuple[int, str]:
        async with service.client.stream(
            "POST", url, json={"content": "only once"}, headers=headers
        ) as response:
            if mode == "sse":
                events = await collect_events(response)
                return response.status_code, events[-1].data["assistant_message"]["id"]
            await response.aread()
            return response.status_code, response.json()["assistant_message"]["id"]

    first = await send()
    second = await send()
    assert first == second
    assert first[0] in (200, 201)
    assert len(await service.messages(conversation["id"])) == 2
    assert len(service.upstream.requests) == 1

    changed = await service.client.post(
        url,
        json={"content": "something else"},
        headers=service.auth() | {"Idempotency-Key": "retry-1"},
    )
    assert changed.status_code == 422
    assert changed.json()["code"] == "idempotency_key_reused"


async def test_a_retry_during_the_reply_attaches_to_the_same_generation(service: Service) -> None:
    gate = asyncio.Event()
    service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
    headers = {**service.auth(), "Idempotency-Key": "new-chat-1"}
    first = await service.client.post(
        "/v1/chat", json={"message": "hi", "background": True}, headers=headers
    )
    assert first.status_code == 202

    async def retry() -> Any:
        return await service.client.post("/v1/chat", json={"message": "hi"}, headers=headers)

    retried = asyncio.create_task(retry())
    await asyncio.sleep(0.2)
    assert not retried.done()  # waiting for the one running reply, not starting another
    gate.set()
    response = await retried
    assert response.status_code == 201
    assert response.json()["assistant_message"]["id"] == first.json()["assistant_message"]["id"]
    assert response.json()["assistant_message"]["content"] == "".join(TOKENS)
    listing = (await service.client.get("/v1/conversations", headers=service.auth())).json()
    assert len(listing["data"]) == 1
    assert len(service.upstream.requests) == 1


async def test_concurrent_retries_with_one_key_start_one_reply(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.default = Reply(first_token_delay=0.2)
    url = f"/v1/conversations/{conversation['id']}/messages"
    headers = {**service.auth(), "Idempotency-Key": "burst"}
    responses = await asyncio.gather(
        *(service.client.post(url, json={"content": "x"}, headers=headers) for _ in range(4))
    )
    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["assistant_message"]["id"] for response in responses}) == 1
    assert len(await service.messages(conversation["id"])) == 2


async def test_pings_keep_a_silent_stream_alive(start_service: Any) -> None:
    async with start_service(sse_ping_seconds=0.2) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(first_token_delay=1.0))
        async with service.client.stream(
            "POST",
            f"/v1/conversations/{conversation['id']}/messages?stream=true",
            json={"content": "think hard"},
            headers=service.auth(),
        ) as response:
            lines = [line async for line in response.aiter_lines()]
        assert lines.count(": ping") >= 3
        assert any(line == "event: done" for line in lines)


async def test_a_client_that_stops_reading_is_dropped_and_the_reply_goes_on(
    start_service: Any,
) -> None:
    # A reply of ~13 MB, far past what socket buffers hold (and CHATBOT_MAX_REPLY_CHARS).
    async with start_service(sse_send_timeout=0.5, max_reply_chars=20_000_000) as service:
        conversation = await service.create_conversation()
        big = ["lorem ipsum " * 5_461] * 200  # ~13 MB of reply: far more than socket buffers hold
        service.upstream.queue(Reply(tokens=big))
        host, port = service.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"content": "flood me"}).encode()
        token = service.auth()["Authorization"]
        writer.write(
            f"POST /v1/conversations/{conversation['id']}/messages?stream=true HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        # Read nothing while the reply is generated and stored.
        reply = await final_reply(service, conversation["id"])
        assert reply["status"] == "completed"
        assert len(reply["content"]) == len("".join(big))
        await asyncio.sleep(1.0)  # past the send timeout
        received = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += len(chunk)
        writer.close()
        # The service gave up on this client: it never sent the whole reply.
        assert received < len("".join(big))

"""Several instances on one database and one Redis: a reply started on one is followed,
stopped and, once its producer dies, stored by another; Redis going away costs no reply."""

import asyncio
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from chatbot.messages.models import MessageStatus
from tests.fake_upstream import UTILITY_MODEL, FakeUpstream, Reply
from tests.support import (
    JWT_SECRET,
    Event,
    RedisServer,
    Service,
    day_usage,
    eventually,
    final_reply,
    free_port,
    listening,
    read_events,
    streamed_text,
)

WORDS = [f" word{index}" for index in range(400)]


class Follower:
    """A client following a reply on one instance, with the time each event arrived."""

    def __init__(self, service: Service, reply_id: str) -> None:
        self.events: list[tuple[float, Event]] = []
        self._task = asyncio.create_task(self._follow(service, reply_id))

    async def _follow(self, service: Service, reply_id: str) -> None:
        async with service.client.stream(
            "GET", f"/v1/messages/{reply_id}/stream", headers=service.auth(), timeout=60
        ) as response:
            assert response.status_code == 200, await response.aread()
            async for event in read_events(response):
                self.events.append((time.monotonic(), event))

    @property
    def deltas(self) -> list[tuple[float, str]]:
        return [(at, event.data["content"]) for at, event in self.events if event.event == "delta"]

    @property
    def text(self) -> str:
        return streamed_text(event for _, event in self.events)

    async def finished(self, seconds: float = 30) -> list[Event]:
        await asyncio.wait_for(self._task, seconds)
        return [event for _, event in self.events]


@asynccontextmanager
async def two_instances(
    start_service: Any, redis: RedisServer, **settings: Any
) -> AsyncIterator[tuple[Service, Service]]:
    async with (
        start_service(redis_url=redis.url, **settings) as a,
        start_service(redis_url=redis.url, **settings) as b,
    ):
        yield a, b


async def start_in_background(service: Service, **body: Any) -> tuple[str, str]:
    conversation = await service.create_conversation()
    response = await service.send(conversation["id"], "go on", background=True, **body)
    assert response.status_code == 202, response.text
    return conversation["id"], response.json()["assistant_message"]["id"]


async def test_a_reply_started_on_one_instance_arrives_delta_by_delta_on_another(
    start_service: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    words = WORDS[:30]
    upstream.queue(Reply(tokens=words, first_token_delay=0.3, token_delay=0.05))
    async with two_instances(start_service, redis_server) as (a, b):
        _, reply_id = await start_in_background(a)
        here, there = Follower(a, reply_id), Follower(b, reply_id)
        await here.finished()
        await there.finished()
        stored = await b.stored_message(reply_id)

    assert stored.status is MessageStatus.COMPLETED
    assert there.text == stored.content == "".join(words)
    # Every token its own delta on the other instance too, as the model sent them.
    assert [text for _, text in there.deltas] == words
    lags = [far - near for (near, _), (far, _) in zip(here.deltas, there.deltas, strict=True)]
    # A few milliseconds behind a follower on the producer's own instance (the flush and one
    # read from Redis), against 2 s checkpoints without Redis.
    assert statistics.median(lags) < 0.03, lags
    assert len(upstream.requests) == 1


async def test_a_cancel_sent_to_another_instance_stops_the_reply_at_once(
    start_service: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    # The model sends its first words, then holds the rest until the test lets it go.
    words = ["".join(WORDS[:5]), *WORDS[5:]]
    upstream.queue(Reply(tokens=words, gate=asyncio.Event()))
    async with two_instances(start_service, redis_server) as (a, b):
        _, reply_id = await start_in_background(a)
        await eventually(lambda: (running := a.running(reply_id)) and running.length)
        asked = time.monotonic()
        cancelled = await b.client.post(f"/v1/messages/{reply_id}/cancel", headers=b.auth())
        took = time.monotonic() - asked
        assert cancelled.status_code == 200, cancelled.text
        assert a.running(reply_id) is None
        stored = await a.stored_message(reply_id)
        await asyncio.sleep(0.5)
        later = await b.stored_message(reply_id)
        await eventually(lambda: upstream.disconnects)

    assert took < 1.0
    body = cancelled.json()["assistant_message"]
    assert body["status"] == "cancelled"
    assert stored.status is MessageStatus.CANCELLED
    assert body["content"] == stored.content == later.content
    assert stored.content == words[0]
    # The producer closed its call to the model while the model still held the rest.
    assert upstream.disconnects == 1


def _instance_environment(
    service: Service, redis: RedisServer, port: int, **extra: str
) -> dict[str, str]:
    settings = service.settings
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": redis.url,
        "OPENAI_BASE_URL": settings.openai_base_url or "",
        "OPENAI_API_KEY": "sk-test-key",
        "CHATBOT_JWT_SECRET": JWT_SECRET,
        "CHATBOT_MODEL": settings.model,
        "CHATBOT_UTILITY_MODEL": UTILITY_MODEL,
        "CHATBOT_DEFAULT_TOOLSETS": "[]",
        "CHATBOT_UPSTREAM_MAX_RETRIES": "0",
        "CHATBOT_PORT": str(port),
        **extra,
    }


async def test_another_instance_stores_what_a_killed_producer_published(
    start_service: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    upstream.queue(Reply(tokens=WORDS, token_delay=0.05))
    async with start_service(redis_url=redis_server.url, reply_lease_seconds=5) as b:
        port = free_port()
        # The producer checkpoints rarely: what it published lives only in Redis.
        environment = _instance_environment(
            b, redis_server, port, CHATBOT_CHECKPOINT_SECONDS="4.5",
            CHATBOT_REPLY_LEASE_SECONDS="5",
        )  # fmt: skip
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatbot", "serve", env=environment,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await eventually(lambda: listening(port), 30)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                a = Service(b.server, b.settings, client, upstream)  # its URL is the client's
                conversation_id, reply_id = await start_in_background(a)
            follower = Follower(b, reply_id)
            await eventually(lambda: len(follower.deltas) >= 10, 10)
            checkpointed = (await b.stored_message(reply_id)).content
            producer.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await producer.wait()
            published = follower.text

            async def stored_incomplete() -> Any:
                row = await b.stored_message(reply_id)
                return row if row.status is MessageStatus.INCOMPLETE else None

            stored = await eventually(stored_incomplete, 15)
            took = time.monotonic() - killed
            events = await follower.finished()
        finally:
            if producer.returncode is None:
                producer.kill()
                await producer.wait()
        next_turn = await b.send(conversation_id, "and now?")

    assert took < 15
    assert stored.content.startswith(published)
    assert len(stored.content) > len(checkpointed)
    # The follower on the other instance saw the reply end, with all of its text.
    assert streamed_text(events) == stored.content
    assert next_turn.status_code == 201, next_turn.text
    assert next_turn.json()["assistant_message"]["status"] == "completed"


async def test_redis_restarted_mid_reply_costs_nothing(
    start_service: Any,
    upstream: FakeUpstream,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="chatbot.replies.redis_bus")
    words = WORDS[:80]
    upstream.queue(
        Reply(tokens=words, token_delay=0.04),
        Reply(tokens=WORDS[:20], first_token_delay=0.3, token_delay=0.03),
    )
    async with two_instances(start_service, redis_server) as (a, b):
        _, reply_id = await start_in_background(a)
        follower = Follower(b, reply_id)
        await eventually(lambda: len(follower.deltas) >= 10, 10)
        await redis_server.stop()
        await asyncio.sleep(1.0)  # tokens go on coming meanwhile
        await redis_server.start()
        events = await follower.finished()
        stored = await a.stored_message(reply_id)

        # The bus recovers by itself: the next reply is live across instances again.
        def live_again() -> bool:
            said = [record.getMessage() for record in caplog.records]
            troubles = sum("cannot be reached" in message for message in said)
            return sum("answers again" in message for message in said) >= troubles

        await eventually(live_again, 10)
        _, second_id = await start_in_background(a)
        second = Follower(b, second_id)
        await second.finished()

    assert stored.status is MessageStatus.COMPLETED
    assert stored.content == "".join(words)
    assert streamed_text(events) == stored.content
    assert [text for _, text in second.deltas] == WORDS[:20]
    warnings = [record for record in caplog.records if "cannot be reached" in record.getMessage()]
    # Once per instance and outage, not once per token.
    assert 1 <= len(warnings) <= 2, [record.getMessage() for record in warnings]
    assert "word" not in caplog.text  # no reply text in the log


async def test_the_cap_on_running_replies_holds_across_instances(
    start_service: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    held = asyncio.Event()
    upstream.default = Reply(gate=held)
    async with two_instances(start_service, redis_server, max_concurrent_replies=4) as (a, b):
        conversations = [await a.create_conversation() for _ in range(10)]
        turns = [
            (a if index % 2 else b).send(conversation["id"], "go", background=True)
            for index, conversation in enumerate(conversations)
        ]
        # New conversations too, through /v1/chat, on both instances at once.
        chats = [
            (a if index % 2 else b).client.post(
                "/v1/chat", json={"message": "go", "background": True}, headers=a.auth()
            )
            for index in range(10)
        ]
        responses = await asyncio.gather(*turns, *chats)
        statuses = sorted(response.status_code for response in responses)
        held.set()

    assert statuses == [202] * 4 + [429] * 16, statuses
    assert len(upstream.requests) == 4


async def test_an_idempotency_key_starts_one_turn_across_instances(
    start_service: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    async with two_instances(start_service, redis_server) as (a, b):
        headers = a.auth() | {"Idempotency-Key": "order-42"}
        responses = await asyncio.gather(
            *(
                (a if index % 2 else b).client.post(
                    "/v1/chat", json={"message": "once"}, headers=headers
                )
                for index in range(10)
            )
        )
    assert {response.status_code for response in responses} <= {200, 201}, [
        response.text for response in responses
    ]
    assert len({response.json()["assistant_message"]["id"] for response in responses}) == 1
    assert len(upstream.requests) == 1


async def test_running_replies_on_several_instances_spend_no_more_than_the_daily_quota(
    start_service: Any, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    held = asyncio.Event()
    upstream.default = Reply(tokens=["x"] * 400, gate=held)
    quota = 1_000
    async with two_instances(
        start_service, redis_server, daily_token_quota=quota, max_concurrent_replies=10
    ) as (a, b):
        conversations = [await a.create_conversation() for _ in range(6)]
        responses = await asyncio.gather(
            *(
                (a if index % 2 else b).send(
                    conversation["id"], "go on", background=True, max_output_tokens=200
                )
                for index, conversation in enumerate(conversations)
            )
        )
        accepted = [response.json() for response in responses if response.status_code == 202]
        await eventually(lambda: len(upstream.requests) == len(accepted))
        held.set()
        for turn in accepted:
            await final_reply(a, turn["conversation_id"])
        prompts = [turn["assistant_message"]["prompt_token_count"] for turn in accepted]
        spent = await day_usage(a.state.sessionmaker, "alice")

    refusals = [response for response in responses if response.status_code == 429]
    # Each turn reserved its prompt and up to 200 tokens: the day holds some of them, not all.
    assert 1 < len(accepted) < 6
    assert len(refusals) == 6 - len(accepted)
    assert {response.json()["code"] for response in refusals} == {"quota_exceeded"}
    sent = [request.body["max_tokens"] for request in upstream.requests]
    # What each call could cost at most, together within the quota, and so what they spent.
    assert sum(prompts) + sum(sent) <= quota
    assert all(limit <= 200 for limit in sent)
    assert spent <= quota
    assert len(upstream.requests) == len(accepted)  # nothing was sent for a refused turn

"""The Redis bus itself, between two buses (two instances) on a Redis of the test's own."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from chatbot.replies.bus import BusUnavailable, OffBus
from chatbot.replies.items import Batch, Delta, Outcome, StopReason, ToolEvent
from chatbot.replies.redis_bus import RedisBus
from tests.support import RedisServer, eventually


@pytest.fixture
async def buses(redis_server: RedisServer) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    made = [
        RedisBus(redis_server.url, lease_seconds=3, ttl_seconds=60, flush_seconds=0.005)
        for _ in range(2)
    ]
    for bus in made:
        await bus.start()
    yield made[0], made[1]
    for bus in made:
        await bus.aclose()


async def _followed(bus: RedisBus, reply_id: uuid.UUID, after: int = 0) -> list[Batch | Outcome]:
    return [item async for item in bus.follow(reply_id, after)]


def _text(followed: list[Batch | Outcome]) -> str:
    return "".join(
        item.text for batch in followed if isinstance(batch, tuple) for item in batch
        if isinstance(item, Delta)
    )  # fmt: skip


async def test_another_bus_follows_from_any_position_to_the_outcome(
    buses: tuple[RedisBus, RedisBus],
) -> None:
    producer, other = buses
    reply_id = uuid.uuid4()
    channel = producer.open(reply_id, lambda _: None)
    channel.publish(Delta("Hello", 5))
    channel.publish(ToolEvent("tool_call", {"id": "c1", "name": "f"}, 6))
    channel.publish(Delta(" world", 12))
    await eventually(lambda: other.alive([reply_id]))  # written: the lease is there
    following = asyncio.create_task(_followed(other, reply_id, after=2))
    await eventually(lambda: other.followers(reply_id) == 1)
    channel.publish(Delta("!", 13))
    channel.finish(Outcome(message={"id": str(reply_id), "content": " world!"}))
    channel.close()
    followed = await asyncio.wait_for(following, 5)

    assert _text(followed) == "llo world!"
    events = [
        item
        for batch in followed
        if isinstance(batch, tuple)
        for item in batch
        if isinstance(item, ToolEvent)
    ]
    assert events == [ToolEvent("tool_call", {"id": "c1", "name": "f"}, 6)]
    assert followed[-1] == Outcome(message={"id": str(reply_id), "content": " world!"})
    assert other.followers(reply_id) == 0


async def test_a_stream_lost_with_redis_is_written_whole_again(
    buses: tuple[RedisBus, RedisBus], redis_server: RedisServer
) -> None:
    producer, other = buses
    reply_id = uuid.uuid4()
    channel = producer.open(reply_id, lambda _: None)
    channel.publish(Delta("ab", 2))
    raw = redis.Redis.from_url(redis_server.url)
    try:
        await eventually(lambda: raw.xlen(f"chatbot:reply:{reply_id}"))
        await raw.flushall()  # as a Redis that restarted without persistence
        channel.publish(Delta("cd", 4))
        await eventually(lambda: raw.exists(f"chatbot:reply:{reply_id}"))
        following = asyncio.create_task(_followed(other, reply_id))
        await asyncio.sleep(0.05)
        channel.finish(Outcome(message={"id": str(reply_id)}))
        channel.close()
        followed = await asyncio.wait_for(following, 5)
        assert await producer.remains(reply_id) == [Delta("ab", 2), Delta("cd", 4)]
    finally:
        await raw.aclose()
    assert _text(followed) == "abcd"


async def test_a_stop_reaches_the_producer_through_any_bus(
    buses: tuple[RedisBus, RedisBus], redis_server: RedisServer
) -> None:
    producer, other = buses
    reply_id = uuid.uuid4()
    asked: list[StopReason] = []
    producer.open(reply_id, asked.append).publish(Delta("x", 1))
    await eventually(lambda: other.alive([reply_id]))
    raw = redis.Redis.from_url(redis_server.url)
    try:  # garbage on the producer's channel is ignored
        await raw.publish(f"chatbot:stop:{producer.instance}", b"\xff not json")
    finally:
        await raw.aclose()
    assert await other.stop(reply_id, StopReason.CANCELLED)
    await eventually(lambda: asked)
    assert asked == [StopReason.CANCELLED]
    assert not await other.stop(uuid.uuid4(), StopReason.CANCELLED)


async def test_a_reply_the_bus_never_held_is_off_the_bus(
    buses: tuple[RedisBus, RedisBus], redis_server: RedisServer
) -> None:
    _, other = buses
    with pytest.raises(OffBus):
        await _followed(other, uuid.uuid4())
    await redis_server.stop()
    with pytest.raises(BusUnavailable):
        await other.alive([uuid.uuid4()])
    with pytest.raises(OffBus):
        await _followed(other, uuid.uuid4())
    assert not await other.stop(uuid.uuid4(), StopReason.CANCELLED)
    assert await other.remains(uuid.uuid4()) is None


async def test_an_ended_reply_is_kept_as_its_text_not_an_entry_per_delta(
    buses: tuple[RedisBus, RedisBus], redis_server: RedisServer
) -> None:
    producer, other = buses
    reply_id = uuid.uuid4()
    channel = producer.open(reply_id, lambda _: None)
    for end in range(1, 201):
        channel.publish(Delta("x", end))
        await asyncio.sleep(0.001 if end % 20 else 0.02)  # several flushes
    channel.publish(ToolEvent("tool_call", {"id": "c1"}, 201))
    channel.publish(Delta("y", 202))
    channel.finish(Outcome(message={"id": str(reply_id)}))
    channel.close()
    raw = redis.Redis.from_url(redis_server.url)
    key = f"chatbot:reply:{reply_id}"

    async def joined() -> bool:  # a while after its end, its followers having read it all
        return bool(await raw.xlen(key) == 1)

    try:
        await eventually(joined, 10)
        entries = await raw.xlen(key)
        expires = await raw.ttl(key)
    finally:
        await raw.aclose()
    assert entries == 1
    assert 0 < expires <= 60
    assert await other.remains(reply_id) == [
        Delta("x" * 200, 200),
        ToolEvent("tool_call", {"id": "c1"}, 201),
        Delta("y", 202),
    ]
    followed = await _followed(other, reply_id, after=150)
    assert _text(followed) == "x" * 50 + "y"


async def test_followers_of_a_closing_bus_hand_over_rather_than_hang(
    buses: tuple[RedisBus, RedisBus],
) -> None:
    producer, other = buses
    reply_id = uuid.uuid4()
    producer.open(reply_id, lambda _: None).publish(Delta("x", 1))
    await eventually(lambda: other.alive([reply_id]))
    following = asyncio.create_task(_followed(other, reply_id))
    await eventually(lambda: other.followers(reply_id) == 1)
    await other.aclose()
    with pytest.raises(OffBus):
        await asyncio.wait_for(following, 5)

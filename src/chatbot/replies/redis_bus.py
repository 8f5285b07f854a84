"""The live bus on Redis: any instance follows, stops and outlives any reply.

Each running reply is a Redis stream, `chatbot:reply:{id}`: entries of items (deltas and tool
events at their positions) that its producer writes in one round trip every few milliseconds
(CHATBOT_REDIS_FLUSH_MS), then its outcome; once the reply has ended the stream expires after
CHATBOT_REDIS_REPLY_TTL_SECONDS. While it runs its producer holds a lease,
`chatbot:lease:{id}`, naming the producer's instance and renewed a few times per
CHATBOT_REPLY_LEASE_SECONDS. A stop goes to that instance over its own pub/sub channel,
`chatbot:stop:{instance}`.

Followers on the producer's instance follow the reply in memory, as without Redis. Followers
elsewhere share one reader per reply and instance (a blocking XREAD), so any number of them
cost one connection.

Redis never keeps a reply: the producer stores it in the database as it would without Redis.
While Redis cannot be reached the producer keeps its items and writes the stream whole once
Redis answers again (also when Redis came back empty); followers elsewhere hand over to the
database where they were; the log says so once per outage.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Collection, Sequence
from contextlib import aclosing
from typing import Any, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatbot.replies.bus import BusUnavailable, InProcessBus, MemoryChannel, StopHandler
from chatbot.replies.items import Batch, Delta, Item, Outcome, StopReason, ToolEvent

logger = logging.getLogger(__name__)

READ_BLOCK_SECONDS = 1.0
"""How long a reader waits on a quiet stream before it checks that the producer lives."""
_RETRY_BACKOFF = (0.1, 5.0)
_CLOSE_SECONDS = 2.0
"""How long closing waits for Redis to take the last writes."""


def _stream(reply_id: uuid.UUID) -> str:
    return f"chatbot:reply:{reply_id}"


def _lease(reply_id: uuid.UUID) -> str:
    return f"chatbot:lease:{reply_id}"


def _stops(instance: str) -> str:
    return f"chatbot:stop:{instance}"


def encode_items(items: Sequence[Item]) -> str:
    # ASCII escapes: a lone surrogate from a provider must not stop the write.
    return json.dumps(
        [
            ["d", item.text, item.end]
            if isinstance(item, Delta)
            else ["t", item.kind, item.data, item.end]
            for item in items
        ],
        separators=(",", ":"),
    )


def decode_items(raw: bytes) -> list[Item]:
    items: list[Item] = []
    for entry in json.loads(raw):
        if entry[0] == "d":
            items.append(Delta(entry[1], entry[2]))
        else:
            items.append(ToolEvent(entry[1], entry[2], entry[3]))
    return items


def joined(items: Sequence[Item]) -> list[Item]:
    """The items with each run of deltas joined into one, at the same positions."""
    result: list[Item] = []
    run: list[Delta] = []
    for item in [*items, None]:
        if isinstance(item, Delta):
            run.append(item)
            continue
        if run:
            result.append(Delta("".join(delta.text for delta in run), run[-1].end))
            run = []
        if item is not None:
            result.append(item)
    return result


def encode_outcome(outcome: Outcome) -> str:
    return json.dumps(
        {
            "message": outcome.message,
            "problem": outcome.problem,
            "headers": outcome.headers,
            "tool_calls": outcome.tool_calls,
        },
        separators=(",", ":"),
    )


def decode_outcome(raw: bytes) -> Outcome:
    data = json.loads(raw)
    return Outcome(
        message=data["message"],
        problem=data["problem"],
        headers=data["headers"],
        tool_calls=data["tool_calls"],
    )


_Entries = list[tuple[bytes, dict[bytes, bytes]]]
"""Stream entries as redis-py returns them (ids and fields as bytes)."""


class _Gap(Exception):
    """Items that do not start where the ones before them ended."""


def _past(item: Item, end: int) -> Item | None:
    """The part of `item` past position `end`: items come again after a rewrite."""
    if item.end <= end:
        return None
    if item.start > end:
        raise _Gap()
    if isinstance(item, Delta) and item.start < end:
        return item.after(end)
    return item


class _Produced:
    """A reply produced here: its items in memory, and how much of them Redis has."""

    def __init__(self, bus: "RedisBus", reply_id: uuid.UUID, local: MemoryChannel) -> None:
        self.reply_id = reply_id
        self.local = local
        self.written = 0
        """How many of the items Redis has."""
        self.outcome_written = False
        self.in_redis = False
        """Whether Redis holds the stream up to `written`; when not, it is written whole."""
        self.closed_at: float | None = None
        self.off_bus = False
        """Set when the reply cannot be written at all: it goes on without the bus."""
        self._bus = bus

    def publish(self, item: Item) -> None:
        self.local.publish(item)
        self._bus.changed(self)

    def finish(self, outcome: Outcome) -> None:
        self.local.finish(outcome)
        self._bus.changed(self)

    def close(self) -> None:
        self.local.close()
        self.closed_at = time.monotonic()
        self._bus.changed(self)

    @property
    def running(self) -> bool:
        return self.local.outcome is None and self.closed_at is None


class _Mirror:
    """A reply produced elsewhere, read from Redis once for all its followers here."""

    def __init__(self, channel: MemoryChannel, reader: asyncio.Task[None]) -> None:
        self.channel = channel
        self.reader = reader


class RedisBus:
    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float,
        ttl_seconds: float,
        flush_seconds: float,
        read_block_seconds: float = READ_BLOCK_SECONDS,
    ) -> None:
        self.lease_seconds: float | None = lease_seconds
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._ttl = max(1, round(ttl_seconds))
        self._flush_seconds = flush_seconds
        self._block_ms = max(1, round(read_block_seconds * 1000))
        # Fail fast, and let the bus decide what a failure means. One retry at once, on a new
        # connection: a pooled one may have died with a Redis that restarted since.
        self._redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=read_block_seconds + 4.0,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=10,
        )
        self.instance = uuid.uuid4().hex
        self._here = InProcessBus()
        self._produced: dict[uuid.UUID, _Produced] = {}
        self._pending: dict[uuid.UUID, _Produced] = {}
        self._wake = asyncio.Event()
        self._mirrors: dict[uuid.UUID, _Mirror] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._reachable = True

    # --- lifetime -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="redis-bus-writer"),
            asyncio.create_task(self._renew_forever(), name="redis-bus-leases"),
            asyncio.create_task(self._listen_forever(), name="redis-bus-stops"),
        ]

    async def aclose(self) -> None:
        """Write what is pending (the last outcomes) if Redis takes it within a bound; the
        followers here of replies produced elsewhere go on from the database."""
        writer = self._tasks[0] if self._tasks else None
        for task in self._tasks[1:]:
            task.cancel()
        for mirror in self._mirrors.values():
            mirror.reader.cancel()
        self._closing = True
        self._wake.set()
        if writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), _CLOSE_SECONDS)
            writer.cancel()
        await asyncio.gather(
            *self._tasks, *(mirror.reader for mirror in self._mirrors.values()),
            return_exceptions=True,
        )  # fmt: skip
        await self._redis.aclose()

    def _trouble(self, exc: BaseException) -> None:
        if self._reachable:
            self._reachable = False
            logger.warning(
                "Redis cannot be reached (%s): replies go on and are stored; followers on "
                "other instances read them from the database until it answers",
                type(exc).__name__,
            )

    def _answered(self) -> None:
        if not self._reachable:
            self._reachable = True
            logger.info("Redis answers again: replies are live across instances")

    # --- producing ----------------------------------------------------------------------------

    def open(self, reply_id: uuid.UUID, on_stop: StopHandler) -> _Produced:
        produced = _Produced(self, reply_id, self._here.open(reply_id, on_stop))
        self._produced[reply_id] = produced
        self.changed(produced)
        return produced

    def changed(self, produced: _Produced) -> None:
        """Something of `produced` is not in Redis yet: the writer takes it within a flush."""
        if produced.off_bus:
            return
        self._pending[produced.reply_id] = produced
        self._wake.set()

    async def _write_forever(self) -> None:
        backoff = _RETRY_BACKOFF[0]
        while not (self._closing and not self._pending):
            await self._wake.wait()
            if self._flush_seconds and not self._closing:
                await asyncio.sleep(self._flush_seconds)
            self._wake.clear()
            batch = list(self._pending.values())
            self._pending.clear()
            try:
                await self._write(batch)
            except (redis.RedisError, OSError) as exc:
                self._trouble(exc)
                now = time.monotonic()
                for produced in batch:
                    produced.in_redis = False  # what landed is unknown: all of it, next time
                    if produced.closed_at is not None and now - produced.closed_at > self._ttl:
                        self._produced.pop(produced.reply_id, None)  # followers have the DB
                    elif produced.reply_id not in self._pending:
                        self._pending[produced.reply_id] = produced
                if self._closing:
                    return
                self._wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_BACKOFF[1])
            else:
                backoff = _RETRY_BACKOFF[0]
                self._answered()

    async def _write(self, batch: list[_Produced]) -> None:
        """One round trip for everything new of `batch`.

        A stream that vanished (Redis restarted empty, or it expired) is written whole on the
        next round trip, and so is a reply that ended: once more, its deltas joined, with its
        outcome, so that what Redis keeps of it until it expires is about its text, not an
        entry per delta. A stream written whole is trimmed to that one entry rather than
        deleted, which keeps its entry ids rising for readers midway (they skip what they
        have by position). Running streams expire too, in case their producer dies: the lease
        renewals push that back."""
        pipe = self._redis.pipeline(transaction=True)
        commands = 0
        plans: list[tuple[_Produced, int | None, int, bool]] = []
        for produced in batch:
            key = _stream(produced.reply_id)
            items = produced.local.items
            count = len(items)
            outcome = produced.local.outcome
            whole = not produced.in_redis or (outcome is not None and not produced.outcome_written)
            try:
                fields = self._fields(produced, items, count, outcome, whole=whole)
            except Exception:
                # Not Redis's doing, so writing it again would fail again: this reply goes on
                # without the bus, and its followers elsewhere read it from the database.
                logger.exception("could not write reply %s to Redis", produced.reply_id)
                produced.off_bus = True
                self._produced.pop(produced.reply_id, None)
                continue
            added = None
            if fields:
                if whole:
                    pipe.xadd(key, fields, maxlen=1, approximate=False)  # type: ignore[arg-type]
                else:
                    pipe.xadd(key, fields, nomkstream=True)  # type: ignore[arg-type]
                added = commands
                pipe.expire(key, self._ttl)
                commands += 2
            if produced.running:
                if whole:
                    pipe.set(_lease(produced.reply_id), self.instance, px=self._lease_ms)
                    commands += 1
            else:
                pipe.delete(_lease(produced.reply_id))
                commands += 1
            plans.append((produced, added, count, whole and outcome is not None))
        results = await pipe.execute()
        for produced, added, count, wrote_outcome in plans:
            if added is not None and results[added] is None:  # NOMKSTREAM: it vanished
                produced.in_redis = False
                self.changed(produced)
                continue
            produced.in_redis = True
            produced.written = count
            produced.outcome_written = produced.outcome_written or wrote_outcome
            if produced.closed_at is not None and produced.reply_id not in self._pending:
                self._produced.pop(produced.reply_id, None)

    @staticmethod
    def _fields(
        produced: _Produced, items: list[Item], count: int, outcome: Outcome | None, *, whole: bool
    ) -> dict[str, str]:
        """The entry to add for `produced`, if any: everything when `whole`, else what is new."""
        if whole:
            fields = {"i": encode_items(joined(items) if outcome is not None else items)}
            if outcome is not None:
                fields["o"] = encode_outcome(outcome)
            return fields
        return (
            {"i": encode_items(items[produced.written : count])} if count > produced.written else {}
        )

    async def _renew_forever(self) -> None:
        while True:
            assert self.lease_seconds is not None
            await asyncio.sleep(self.lease_seconds / 3)
            running = [each for each in self._produced.values() if each.running and each.in_redis]
            if not running:
                continue
            try:
                pipe = self._redis.pipeline(transaction=False)
                for produced in running:
                    pipe.set(_lease(produced.reply_id), self.instance, px=self._lease_ms)
                for produced in running:
                    pipe.expire(_stream(produced.reply_id), self._ttl)
                results = await pipe.execute()
            except Exception as exc:
                self._trouble(exc)
                continue
            for produced, exists in zip(running, results[len(running) :], strict=True):
                if not exists:  # Redis restarted empty while the reply was quiet
                    produced.in_redis = False
                    self.changed(produced)

    async def _listen_forever(self) -> None:
        """Stops sent to this instance, for replies produced here."""
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(_stops(self.instance))
                self._answered()
                while True:
                    message = await pubsub.get_message(timeout=READ_BLOCK_SECONDS)
                    if message is not None:
                        self._stop_asked(message["data"])
            except Exception as exc:
                self._trouble(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(1.0)

    def _stop_asked(self, data: bytes) -> None:
        try:
            asked = json.loads(data)
            reply_id, reason = uuid.UUID(asked["id"]), StopReason(asked["reason"])
        except Exception:
            logger.warning("ignored a malformed stop message")
            return
        self._here.stop_here(reply_id, reason)

    async def stop(self, reply_id: uuid.UUID, reason: StopReason) -> bool:
        if self._here.stop_here(reply_id, reason):
            return True
        try:
            owner = await self._redis.get(_lease(reply_id))
            if owner is None:
                return False
            message = json.dumps({"id": str(reply_id), "reason": reason.value})
            receivers: int = await self._redis.publish(
                _stops(owner.decode() if isinstance(owner, bytes) else owner), message
            )
        except Exception as exc:
            self._trouble(exc)
            return False
        return receivers > 0

    async def alive(self, reply_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        alive = await self._here.alive(reply_ids)
        elsewhere = [reply_id for reply_id in reply_ids if reply_id not in alive]
        if not elsewhere:
            return alive
        try:
            pipe = self._redis.pipeline(transaction=False)
            for reply_id in elsewhere:
                pipe.exists(_lease(reply_id))
            leased = await pipe.execute()
        except Exception as exc:
            self._trouble(exc)
            raise BusUnavailable() from exc
        return alive | {reply_id for reply_id, held in zip(elsewhere, leased, strict=True) if held}

    async def remains(self, reply_id: uuid.UUID) -> list[Item] | None:
        try:
            entries = cast(_Entries, await self._redis.xrange(_stream(reply_id)))
        except Exception as exc:
            self._trouble(exc)
            return None
        items: list[Item] = []
        end = 0
        try:
            for _, fields in entries:
                for item in decode_items(fields.get(b"i", b"[]")):
                    if (piece := _past(item, end)) is not None:
                        items.append(piece)
                        end = piece.end
        except _Gap:
            return None
        return items or None

    # --- following ----------------------------------------------------------------------------

    async def follow(
        self, reply_id: uuid.UUID, after: int
    ) -> AsyncGenerator[Batch | Outcome, None]:
        source = (
            self._here.follow(reply_id, after)
            if self._here.holds(reply_id)
            else self._follow_elsewhere(reply_id, after)
        )
        async with aclosing(source) as items:
            async for item in items:
                yield item

    async def _follow_elsewhere(
        self, reply_id: uuid.UUID, after: int
    ) -> AsyncGenerator[Batch | Outcome, None]:
        mirror = self._mirrors.get(reply_id)
        if mirror is None or mirror.channel.lost:  # a lost reader is not asked again
            channel = MemoryChannel(lambda _: None, lambda: None)
            reader = asyncio.create_task(self._read(reply_id, channel), name="redis-bus-reader")
            mirror = self._mirrors[reply_id] = _Mirror(channel, reader)
        try:
            async with aclosing(mirror.channel.follow(after)) as items:
                async for item in items:
                    yield item
        finally:
            if mirror.channel.followers == 0 and self._mirrors.get(reply_id) is mirror:
                del self._mirrors[reply_id]
                mirror.reader.cancel()

    async def _read(self, reply_id: uuid.UUID, channel: MemoryChannel) -> None:
        """Copy the reply's stream into `channel` until its outcome; lose it when the stream
        is not there, has a hole, its producer died, or Redis cannot be reached."""
        key = _stream(reply_id)
        last: bytes | str = "0-0"
        try:
            if not await self._redis.exists(key):
                channel.lose()
                return
            while True:
                read = await self._entries(key, last, block=True)
                if not read and not await self._redis.exists(_lease(reply_id)):
                    # No producer: one last look for what it wrote before it went.
                    read = await self._entries(key, last, block=False)
                    if not read:
                        channel.lose()
                        return
                for entry_id, fields in read:
                    last = entry_id
                    if self._take(channel, fields):
                        return
        except asyncio.CancelledError:
            channel.lose()  # its followers, if any are left, go on from the database
            raise
        except Exception as exc:
            if isinstance(exc, (redis.RedisError, OSError)):
                self._trouble(exc)
            else:
                logger.exception("could not read reply %s from Redis", reply_id)
            channel.lose()

    async def _entries(self, key: str, last: bytes | str, *, block: bool) -> _Entries:
        read = await self._redis.xread(
            {key: last}, count=1000, block=self._block_ms if block else None
        )
        return cast(_Entries, cast(list[Any], read)[0][1]) if read else []

    @staticmethod
    def _take(channel: MemoryChannel, fields: dict[bytes, bytes]) -> bool:
        """Add an entry's items to `channel`; True once it holds the outcome (or a hole)."""
        try:
            for item in decode_items(fields.get(b"i", b"[]")):
                if (piece := _past(item, channel.end)) is not None:
                    channel.publish(piece)
        except _Gap:
            channel.lose()
            return True
        if (outcome := fields.get(b"o")) is not None:
            channel.finish(decode_outcome(outcome))
            return True
        return False

    def followers(self, reply_id: uuid.UUID) -> int:
        mirror = self._mirrors.get(reply_id)
        return self._here.followers(reply_id) + (mirror.channel.followers if mirror else 0)

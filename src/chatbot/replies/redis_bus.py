"""The live bus on Redis: any instance follows, stops and outlives any reply.

Each running reply is a Redis stream, `chatbot:reply:{id}`: entries of items (deltas and tool
events at their positions) that its producer writes in one round trip every few milliseconds
(CHATBOT_REDIS_FLUSH_MS), then its outcome; once the reply has ended the stream expires after
CHATBOT_REDIS_REPLY_TTL_SECONDS. While it runs its producer holds a lease,
`chatbot:lease:{id}`, naming the producer's instance and renewed a few times per
CHATBOT_REPLY_LEASE_SECONDS. A stop goes to that instance over its own pub/sub channel,
`chatbot:stop:{instance}`.

Followers on the producer's instance follow the reply in memory, as without Redis. Elsewhere
one reader per instance reads every reply followed there (one blocking XREAD over all their
streams), so any number of followers of any number of replies cost one connection, and one
round trip brings what a producer's flush wrote for all of them.

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
_JOIN_AFTER_SECONDS = 2.0
"""How long after a reply ended its stream is joined into one entry: its followers here and
elsewhere have read it all by then (a reader that falls further behind gets the rest of the
text in one delta)."""
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
        self.ended_at: float | None = None
        """When Redis took the outcome; the stream is joined into one entry a while after."""
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

    def __init__(self, reply_id: uuid.UUID) -> None:
        self.reply_id = reply_id
        self.key = _stream(reply_id).encode()
        self.channel = MemoryChannel(lambda _: None, lambda: None)
        self.last: bytes = b"0-0"
        self.found = False
        """Whether its stream was there when the reader first looked."""
        self.heard_at = time.monotonic()
        self.left = False
        """Its last follower here left: the reader lets it go."""

    @property
    def done(self) -> bool:
        return self.left or self.channel.lost or self.channel.outcome is not None


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
        self._wanted = asyncio.Event()
        self._wake_key = f"chatbot:wake:{self.instance}"

    # --- lifetime -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="redis-bus-writer"),
            asyncio.create_task(self._renew_forever(), name="redis-bus-leases"),
            asyncio.create_task(self._listen_forever(), name="redis-bus-stops"),
            asyncio.create_task(self._read_forever(), name="redis-bus-reader"),
        ]

    async def aclose(self) -> None:
        """Write what is pending (the last outcomes) if Redis takes it within a bound; the
        followers here of replies produced elsewhere go on from the database."""
        writer = self._tasks[0] if self._tasks else None
        for task in self._tasks[1:]:
            task.cancel()
        for mirror in self._mirrors.values():
            mirror.channel.lose()  # their followers go on from the database
        self._closing = True
        self._wake.set()
        if writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), _CLOSE_SECONDS)
            writer.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
        """One round trip for everything new of `batch`: an entry per reply, no more.

        A stream that vanished (Redis restarted empty, or it expired) is written whole on the
        next round trip, trimmed to that one entry rather than deleted, which keeps its entry
        ids rising for readers midway (they skip what they have by position)."""
        pipe = self._redis.pipeline(transaction=False)
        commands = 0
        plans: list[tuple[_Produced, int | None, int, bool]] = []
        for produced in batch:
            key = _stream(produced.reply_id)
            items = produced.local.items
            count = len(items)
            outcome = produced.local.outcome
            whole = not produced.in_redis
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
                added = commands
                if whole:
                    pipe.xadd(key, fields, maxlen=1, approximate=False)  # type: ignore[arg-type]
                    pipe.expire(key, self._ttl)
                    commands += 2
                else:
                    pipe.xadd(key, fields, nomkstream=True)  # type: ignore[arg-type]
                    commands += 1
            if produced.running:
                if whole:
                    pipe.set(_lease(produced.reply_id), self.instance, px=self._lease_ms)
                    commands += 1
            else:
                pipe.expire(key, self._ttl)
                pipe.delete(_lease(produced.reply_id))
                commands += 2
            plans.append((produced, added, count, "o" in fields))
        results = await pipe.execute()
        now = time.monotonic()
        for produced, added, count, wrote_outcome in plans:
            if added is not None and results[added] is None:  # NOMKSTREAM: it vanished
                produced.in_redis = False
                self.changed(produced)
                continue
            produced.in_redis = True
            produced.written = count
            if wrote_outcome:
                produced.outcome_written = True
                produced.ended_at = now
            elif produced.closed_at is not None and produced.local.outcome is None:
                self._produced.pop(produced.reply_id, None)  # ended with no outcome to tell

    @staticmethod
    def _fields(
        produced: _Produced, items: list[Item], count: int, outcome: Outcome | None, *, whole: bool
    ) -> dict[str, str]:
        """The entry to add for `produced`, if any: everything when `whole`, else what is new;
        the outcome once there is one and Redis has not got it."""
        fields: dict[str, str] = {}
        if whole:
            fields["i"] = encode_items(items)
        elif count > produced.written:
            fields["i"] = encode_items(items[produced.written : count])
        if outcome is not None and (whole or not produced.outcome_written):
            fields["o"] = encode_outcome(outcome)
        return fields

    async def _renew_forever(self) -> None:
        """Renew the leases of running replies (and push their streams' expiry back), and
        join ended ones into one entry."""
        while True:
            assert self.lease_seconds is not None
            await asyncio.sleep(self.lease_seconds / 3)
            running = [each for each in self._produced.values() if each.running and each.in_redis]
            now = time.monotonic()
            ended = [
                each
                for each in self._produced.values()
                if each.ended_at is not None and now - each.ended_at >= _JOIN_AFTER_SECONDS
            ]
            if not running and not ended:
                continue
            try:
                pipe = self._redis.pipeline(transaction=False)
                for produced in running:
                    pipe.set(_lease(produced.reply_id), self.instance, px=self._lease_ms)
                for produced in running:
                    pipe.expire(_stream(produced.reply_id), self._ttl)
                for produced in ended:
                    self._join(pipe, produced)
                results = await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                self._trouble(exc)
                for produced in ended:
                    if produced.ended_at is not None and now - produced.ended_at > self._ttl:
                        self._produced.pop(produced.reply_id, None)
                continue
            for produced, exists in zip(running, results[len(running) :], strict=False):
                if not exists:  # Redis restarted empty while the reply was quiet
                    produced.in_redis = False
                    self.changed(produced)
            for produced in ended:
                self._produced.pop(produced.reply_id, None)

    def _join(self, pipe: Any, produced: _Produced) -> None:
        """An ended reply, a while after its followers had it all: one entry, its deltas
        joined, with its outcome, so that what Redis keeps of it until it expires is about its
        text, not an entry per flush. Not for a stream that is gone."""
        outcome = produced.local.outcome
        assert outcome is not None
        fields = {"i": encode_items(joined(produced.local.items)), "o": encode_outcome(outcome)}
        pipe.xadd(_stream(produced.reply_id), fields, maxlen=1, approximate=False, nomkstream=True)

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

    def follow(self, reply_id: uuid.UUID, after: int) -> AsyncGenerator[Batch | Outcome, None]:
        if self._here.holds(reply_id):
            return self._here.follow(reply_id, after)
        return self._follow_elsewhere(reply_id, after)

    async def _follow_elsewhere(
        self, reply_id: uuid.UUID, after: int
    ) -> AsyncGenerator[Batch | Outcome, None]:
        mirror = self._mirrors.get(reply_id)
        if mirror is None or mirror.channel.lost:  # a lost one is not asked again
            mirror = self._mirrors[reply_id] = _Mirror(reply_id)
            await self._wake_reader()
        try:
            async with aclosing(mirror.channel.follow(after)) as items:
                async for item in items:
                    yield item
        finally:
            if mirror.channel.followers == 0 and self._mirrors.get(reply_id) is mirror:
                del self._mirrors[reply_id]
                mirror.left = True

    async def _wake_reader(self) -> None:
        """Have the reader, blocked on the streams it had, read a new one too."""
        self._wanted.set()
        with contextlib.suppress(Exception):  # else it takes it in within a block
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.expire(self._wake_key, self._ttl)
            await pipe.execute()

    async def _read_forever(self) -> None:
        """The one reader of every reply followed here and produced elsewhere: a blocking
        XREAD over all their streams (and this instance's wake stream), so one round trip
        brings what a producer's flush wrote for all of them. A reply is lost (its followers
        go on from the database) when its stream is not there, has a hole, its producer died,
        or Redis cannot be reached."""
        wake_last = b"0-0"
        backoff = _RETRY_BACKOFF[0]
        while True:
            reading = [mirror for mirror in self._mirrors.values() if not mirror.done]
            if not reading:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            try:
                await self._find([mirror for mirror in reading if not mirror.found])
                reading = [mirror for mirror in reading if mirror.found and not mirror.done]
                streams: dict[bytes, bytes] = {mirror.key: mirror.last for mirror in reading}
                streams[self._wake_key.encode()] = wake_last
                read = await self._redis.xread(
                    streams,  # type: ignore[arg-type]
                    count=1000,
                    block=self._block_ms,
                )
                now = time.monotonic()
                by_key = {mirror.key: mirror for mirror in reading}
                for key, entries in cast(list[tuple[bytes, _Entries]], read or []):
                    if (mirror := by_key.get(key)) is None:
                        wake_last = entries[-1][0]
                        continue
                    mirror.heard_at = now
                    self._take(mirror, entries)
                await self._check_quiet(
                    [each for each in reading if not each.done and now - each.heard_at > 1.0]
                )
            except asyncio.CancelledError:
                for mirror in self._mirrors.values():
                    mirror.channel.lose()  # their followers go on from the database
                raise
            except Exception as exc:
                if isinstance(exc, (redis.RedisError, OSError)):
                    self._trouble(exc)
                else:
                    logger.exception("could not read replies from Redis")
                for mirror in reading:
                    mirror.channel.lose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RETRY_BACKOFF[1])
            else:
                backoff = _RETRY_BACKOFF[0]

    async def _find(self, new: list[_Mirror]) -> None:
        """Start reading the new ones whose streams are there; lose the others."""
        if not new:
            return
        pipe = self._redis.pipeline(transaction=False)
        for mirror in new:
            pipe.exists(mirror.key)
        for mirror, there in zip(new, await pipe.execute(), strict=True):
            if there:
                mirror.found = True
            else:
                mirror.channel.lose()

    async def _check_quiet(self, quiet: list[_Mirror]) -> None:
        """Of the replies nothing came for a while: those whose producer died are lost, after
        one last look for what it wrote before it went."""
        if not quiet:
            return
        pipe = self._redis.pipeline(transaction=False)
        for mirror in quiet:
            pipe.exists(_lease(mirror.reply_id))
        leased = await pipe.execute()
        now = time.monotonic()
        orphans = [mirror for mirror, held in zip(quiet, leased, strict=True) if not held]
        for mirror in quiet:
            mirror.heard_at = now  # asked again after as long
        if not orphans:
            return
        last = {mirror.key: mirror.last for mirror in orphans}
        read = await self._redis.xread(last, count=1000)  # type: ignore[arg-type]
        by_key = {mirror.key: mirror for mirror in orphans}
        for key, entries in cast(list[tuple[bytes, _Entries]], read or []):
            self._take(by_key[key], entries)
        for mirror in orphans:
            if not mirror.done:
                mirror.channel.lose()

    @staticmethod
    def _take(mirror: _Mirror, entries: _Entries) -> None:
        """Add entries to the mirror's channel, up to the outcome (or a hole)."""
        channel = mirror.channel
        for entry_id, fields in entries:
            mirror.last = entry_id
            if channel.lost or channel.outcome is not None:
                return
            try:
                for item in decode_items(fields.get(b"i", b"[]")):
                    if (piece := _past(item, channel.end)) is not None:
                        channel.publish(piece)
            except _Gap:
                channel.lose()
                return
            if (outcome := fields.get(b"o")) is not None:
                channel.finish(decode_outcome(outcome))

    def followers(self, reply_id: uuid.UUID) -> int:
        mirror = self._mirrors.get(reply_id)
        return self._here.followers(reply_id) + (mirror.channel.followers if mirror else 0)

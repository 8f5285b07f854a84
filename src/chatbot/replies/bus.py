"""The live bus: how a running reply reaches the clients that follow it, and how a stop reaches
the process that produces it.

Four things, whatever carries them: publish an item at its position; subscribe from any
position; a stop signal to the producer; the producer's liveness. `InProcessBus` carries them
inside one process and is the default; `RedisBus` (`redis_bus.py`) carries them between
processes behind the same two protocols, and nothing that produces or follows a reply changes.
"""

import asyncio
import bisect
import contextlib
import uuid
from collections.abc import AsyncGenerator, Callable, Collection
from typing import Protocol

from chatbot.replies.items import Batch, Item, Outcome, StopReason, items_after

StopHandler = Callable[[StopReason], None]


class OffBus(Exception):
    """The bus cannot go on with this reply: it never held it, the reply ended a while ago, or
    the bus lost it (its producer died, or the bus cannot be reached). The database has it."""


class BusUnavailable(Exception):
    """The bus cannot be reached: what it would say is unknown."""


class ReplyChannel(Protocol):
    """The producer's side of one reply on the bus."""

    def publish(self, item: Item) -> None:
        """Add the next item; it must start where the last one ended. Never blocks."""
        ...

    def finish(self, outcome: Outcome) -> None:
        """The reply ended (and is stored): followers get the outcome after the last item."""
        ...

    def close(self) -> None:
        """The producer is done with the reply; the bus may forget it."""
        ...


class LiveBus(Protocol):
    lease_seconds: float | None
    """How soon a dead producer's replies are known dead on this bus, when the bus reaches
    every instance; None when it does not (the database's checkpoints are then the sign)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def open(self, reply_id: uuid.UUID, on_stop: StopHandler) -> ReplyChannel:
        """Put a reply on the bus; a stop asked for it from anywhere calls `on_stop`."""
        ...

    def follow(self, reply_id: uuid.UUID, after: int) -> AsyncGenerator[Batch | Outcome, None]:
        """The reply's items past position `after` as they come, then its outcome. Raises
        `OffBus` when the bus cannot go on (at once, or after the items it had)."""
        ...

    async def stop(self, reply_id: uuid.UUID, reason: StopReason) -> bool:
        """Ask the reply's producer to stop; False when no producer holds it."""
        ...

    async def alive(self, reply_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """Those of the replies whose producer is alive; `BusUnavailable` when unknown."""
        ...

    async def remains(self, reply_id: uuid.UUID) -> list[Item] | None:
        """All the items the bus holds of a reply whose producer died, from the start; None
        when it holds none, or not from the start."""
        ...

    def followers(self, reply_id: uuid.UUID) -> int:
        """Clients following the reply live right now (here)."""
        ...


class MemoryChannel:
    """One reply's items in memory. Followers wake on each change; the items that arrived since
    a follower last woke come as one batch, so one that falls behind (a busy process) catches
    up in one send, not one send per delta. A follower waits on a future of its own, made only
    when it has caught up: a publish wakes the followers waiting, and costs nothing more."""

    def __init__(self, on_stop: StopHandler, forget: Callable[[], None]) -> None:
        self.on_stop = on_stop
        self.followers = 0
        self.outcome: Outcome | None = None
        self.items: list[Item] = []
        self._ends: list[int] = []
        self._lost = False
        self._waiting: list[asyncio.Future[None]] = []
        self._forget = forget

    @property
    def end(self) -> int:
        return self._ends[-1] if self._ends else 0

    def publish(self, item: Item) -> None:
        self.items.append(item)
        self._ends.append(item.end)
        self._notify()

    @property
    def lost(self) -> bool:
        return self._lost

    def lose(self) -> None:
        """The rest of the reply will not come this way: followers get what there is, then
        `OffBus`."""
        self._lost = True
        self._notify()

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._notify()

    def close(self) -> None:
        self._forget()

    def _notify(self) -> None:
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(None)

    async def follow(self, after: int) -> AsyncGenerator[Batch | Outcome, None]:
        index = bisect.bisect_right(self._ends, after)
        self.followers += 1
        try:
            while True:
                # A follower may have asked for more than there was.
                batch = items_after(self.items[index:], after)
                index = len(self.items)
                if batch:
                    yield tuple(batch)
                    after = batch[-1].end
                    # More may have come, and the reply may have ended, while that was sent.
                    continue
                if self.outcome is not None:
                    yield self.outcome
                    return
                if self._lost:
                    raise OffBus()
                waiter = asyncio.get_running_loop().create_future()
                self._waiting.append(waiter)
                try:
                    await waiter
                finally:
                    if not waiter.done() or waiter.cancelled():  # this follower left
                        with contextlib.suppress(ValueError):
                            self._waiting.remove(waiter)
        finally:
            self.followers -= 1


class InProcessBus:
    """The bus of one process: replies produced here are followed and stopped from here; any
    other process sees them through the database."""

    lease_seconds: float | None = None

    def __init__(self) -> None:
        self._channels: dict[uuid.UUID, MemoryChannel] = {}

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def open(self, reply_id: uuid.UUID, on_stop: StopHandler) -> MemoryChannel:
        channel = MemoryChannel(on_stop, lambda: self._forget(reply_id))
        self._channels[reply_id] = channel
        return channel

    def _forget(self, reply_id: uuid.UUID) -> None:
        self._channels.pop(reply_id, None)

    def holds(self, reply_id: uuid.UUID) -> bool:
        return reply_id in self._channels

    def follow(self, reply_id: uuid.UUID, after: int) -> AsyncGenerator[Batch | Outcome, None]:
        """The channel's own generator, not one wrapping it: each layer costs every batch."""
        channel = self._channels.get(reply_id)
        if channel is None:
            raise OffBus()
        return channel.follow(after)

    async def stop(self, reply_id: uuid.UUID, reason: StopReason) -> bool:
        return self.stop_here(reply_id, reason)

    def stop_here(self, reply_id: uuid.UUID, reason: StopReason) -> bool:
        channel = self._channels.get(reply_id)
        if channel is None:
            return False
        channel.on_stop(reason)  # a producer that is storing the reply already lets it finish
        return True

    async def alive(self, reply_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        return {reply_id for reply_id in reply_ids if reply_id in self._channels}

    async def remains(self, reply_id: uuid.UUID) -> list[Item] | None:
        return None  # a producer of this process that died took its items with it

    def followers(self, reply_id: uuid.UUID) -> int:
        channel = self._channels.get(reply_id)
        return channel.followers if channel is not None else 0

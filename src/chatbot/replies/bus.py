"""The live bus: how a running reply reaches the clients that follow it, and how a stop reaches
the process that produces it.

Four things, whatever carries them: publish an item at its position; subscribe from any
position; a stop signal to the producer; the producer's liveness. `InProcessBus` carries them
inside one process and is the default; a bus shared by several processes (Redis) implements the
same two protocols, and nothing that produces or follows a reply changes.
"""

import asyncio
import bisect
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from typing import Protocol

from chatbot.replies.items import Batch, Delta, Item, Outcome, StopReason

StopHandler = Callable[[StopReason], None]


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
    def open(self, reply_id: uuid.UUID, on_stop: StopHandler) -> ReplyChannel:
        """Put a reply on the bus; a stop asked for it from anywhere calls `on_stop`."""
        ...

    def follow(self, reply_id: uuid.UUID, after: int) -> AsyncIterator[Batch | Outcome] | None:
        """The reply's items past position `after` as they come, then its outcome; None when
        the bus does not hold the reply (it never ran, or ended a while ago: the database
        has it)."""
        ...

    async def stop(self, reply_id: uuid.UUID, reason: StopReason) -> bool:
        """Ask the reply's producer to stop; False when no producer holds it."""
        ...

    async def alive(self, reply_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """Those of the replies whose producer is alive."""
        ...

    def followers(self, reply_id: uuid.UUID) -> int:
        """Clients following the reply live right now (here)."""
        ...


class _LocalChannel:
    """One reply's items in memory. Followers wake on each change; the items that arrived since
    a follower last woke come as one batch, so one that falls behind (a busy process) catches
    up in one send, not one send per delta."""

    def __init__(self, on_stop: StopHandler, forget: Callable[[], None]) -> None:
        self.on_stop = on_stop
        self.followers = 0
        self.outcome: Outcome | None = None
        self._items: list[Item] = []
        self._ends: list[int] = []
        self._changed = asyncio.Event()
        self._forget = forget

    def publish(self, item: Item) -> None:
        self._items.append(item)
        self._ends.append(item.end)
        self._notify()

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._notify()

    def close(self) -> None:
        self._forget()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[Batch | Outcome]:
        index = bisect.bisect_right(self._ends, after)
        self.followers += 1
        try:
            while True:
                changed = self._changed
                batch: list[Item] = []
                while index < len(self._items):
                    item = self._items[index]
                    index += 1
                    if item.end <= after:  # a follower that asked for more than there was
                        continue
                    if isinstance(item, Delta) and item.start < after:
                        item = item.after(after)
                    batch.append(item)
                if batch:
                    yield tuple(batch)
                    # More may have come, and the reply may have ended, while that was sent.
                    continue
                if self.outcome is not None:
                    yield self.outcome
                    return
                await changed.wait()
        finally:
            self.followers -= 1


class InProcessBus:
    """The bus of one process: replies produced here are followed and stopped from here; any
    other process sees them through the database."""

    def __init__(self) -> None:
        self._channels: dict[uuid.UUID, _LocalChannel] = {}

    def open(self, reply_id: uuid.UUID, on_stop: StopHandler) -> ReplyChannel:
        channel = _LocalChannel(on_stop, lambda: self._forget(reply_id))
        self._channels[reply_id] = channel
        return channel

    def _forget(self, reply_id: uuid.UUID) -> None:
        self._channels.pop(reply_id, None)

    def follow(self, reply_id: uuid.UUID, after: int) -> AsyncIterator[Batch | Outcome] | None:
        channel = self._channels.get(reply_id)
        return channel.follow(after) if channel is not None else None

    async def stop(self, reply_id: uuid.UUID, reason: StopReason) -> bool:
        channel = self._channels.get(reply_id)
        if channel is None:
            return False
        channel.on_stop(reason)  # a producer that is storing the reply already lets it finish
        return True

    async def alive(self, reply_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        return {reply_id for reply_id in reply_ids if reply_id in self._channels}

    def followers(self, reply_id: uuid.UUID) -> int:
        channel = self._channels.get(reply_id)
        return channel.followers if channel is not None else 0

"""Replies run as tasks owned by the service; HTTP responses only follow them.

A `Generation` buffers what the model has produced so far and wakes its followers on each
change, so any number of clients can follow one reply, from any position, and a client that
goes away costs the reply nothing. A position counts the characters of text and one for each
tool event: a reply that calls no tools is positioned by characters alone. `ReplyRegistry` is
what the rest of the service needs from the set of running replies; `InProcessRegistry` keeps
them in this process.
"""

import asyncio
import bisect
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    end: int
    """The stream position once this delta is delivered."""

    def after(self, position: int) -> "Delta":
        """The part of this delta past `position` (which falls inside it)."""
        return Delta(self.text[position - (self.end - len(self.text)) :], self.end)


@dataclass(frozen=True, slots=True)
class ToolEvent:
    """A call the model made (`tool_call`) or its result (`tool_result`), between deltas."""

    kind: str
    data: dict[str, Any]
    end: int


Item = Delta | ToolEvent
Deltas = tuple[Item, ...]
"""Deltas and tool events in order, available at the same moment."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a reply ended: the stored message, and the problem document if it failed."""

    message: dict[str, Any]
    problem: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    """Response headers that go with the problem (Retry-After on a 429)."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """The calls the reply made, with the start of each result."""


class StopReason(enum.Enum):
    CANCELLED = "cancelled"
    """Somebody asked for it to stop (`POST /v1/messages/{id}/cancel`, or a client leaving)."""
    SHUTDOWN = "shutdown"
    """The process is stopping."""
    SUPERSEDED = "superseded"
    """The stored row was finished elsewhere (cancelled on another instance, or swept)."""


class Generation:
    def __init__(self, message_id: uuid.UUID, conversation_id: uuid.UUID, user_id: str) -> None:
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.user_id = user_id
        self.stop_reason: StopReason | None = None
        self.finishing = False
        """Set once the reply is being stored: from then on nothing may interrupt it."""
        self.saved_length = 0
        """The position the last checkpoint stored."""
        self.followers = 0
        """Clients following it live right now."""
        self.reply_seq: int | None = None
        """Where the reply's row sits; each round of tool calls moves it past its messages."""
        self._pieces: list[str | ToolEvent] = []
        self._ends: list[int] = []
        self._round_start = 0
        self._outcome: Outcome | None = None
        self._changed = asyncio.Event()

    @property
    def content(self) -> str:
        """The text of the current round: what the reply's row holds. The text of earlier
        rounds went into the messages that called tools."""
        return "".join(
            piece for piece in self._pieces[self._round_start :] if isinstance(piece, str)
        )

    @property
    def length(self) -> int:
        """The stream position: characters plus tool events delivered so far."""
        return self._ends[-1] if self._ends else 0

    @property
    def round_has_output(self) -> bool:
        """Whether the current round has any text (tool events do not count)."""
        return any(isinstance(piece, str) for piece in self._pieces[self._round_start :])

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def append(self, text: str) -> None:
        self._pieces.append(text)
        self._ends.append(self.length + len(text))
        self._notify()

    def add_event(self, kind: str, data: dict[str, Any]) -> None:
        self._pieces.append(ToolEvent(kind, data, self.length + 1))
        self._ends.append(self.length + 1)
        self._notify()

    def new_round(self) -> None:
        """What came so far is stored elsewhere; the reply's content starts again."""
        self._round_start = len(self._pieces)

    def finish(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self) -> Outcome:
        while self._outcome is None:
            await self._changed.wait()
        return self._outcome

    async def follow(self, starting_after: int = 0) -> AsyncIterator[Deltas | Outcome]:
        """Every delta and tool event after position `starting_after`, as it arrives, then
        the outcome.

        The deltas that arrived since the follower last woke come together: a follower that
        falls behind (a busy process) catches up in one send, not one send per delta."""
        index = bisect.bisect_right(self._ends, starting_after)
        self.followers += 1
        try:
            while True:
                changed = self._changed
                batch: list[Item] = []
                while index < len(self._pieces):
                    piece, end = self._pieces[index], self._ends[index]
                    index += 1
                    if isinstance(piece, ToolEvent):
                        batch.append(piece)
                        continue
                    delta = Delta(piece, end)
                    if starting_after > end - len(piece):
                        delta = delta.after(starting_after)
                    if delta.text:
                        batch.append(delta)
                if batch:
                    yield tuple(batch)
                    # More may have come, and the reply may have ended, while that was sent.
                    continue
                if self._outcome is not None:
                    yield self._outcome
                    return
                await changed.wait()
        finally:
            self.followers -= 1


class ReplyRegistry(Protocol):
    """The running replies, as the service sees them."""

    def start(self, generation: Generation, work: Coroutine[Any, Any, None]) -> None: ...

    def get(self, message_id: uuid.UUID) -> Generation | None: ...

    def running(self) -> list[Generation]: ...

    async def stop(self, message_id: uuid.UUID, reason: StopReason) -> Generation | None:
        """Stop a running reply; it stores itself with a status that fits the reason.

        None when the reply does not run here. A reply already being stored is left to
        finish: its outcome is what the caller gets.
        """
        ...

    async def shutdown(self, grace_seconds: float) -> None: ...


class InProcessRegistry:
    def __init__(self) -> None:
        self._running: dict[uuid.UUID, tuple[Generation, asyncio.Task[None]]] = {}

    def start(self, generation: Generation, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"reply-{generation.message_id}")
        self._running[generation.message_id] = (generation, task)
        task.add_done_callback(lambda _: self._running.pop(generation.message_id, None))

    def get(self, message_id: uuid.UUID) -> Generation | None:
        entry = self._running.get(message_id)
        return entry[0] if entry else None

    def running(self) -> list[Generation]:
        return [generation for generation, _ in self._running.values()]

    async def stop(self, message_id: uuid.UUID, reason: StopReason) -> Generation | None:
        entry = self._running.get(message_id)
        if entry is None:
            return None
        generation, task = entry
        if generation.stop_reason is None and not generation.finishing:
            generation.stop_reason = reason
            task.cancel()
        return generation

    def __len__(self) -> int:
        return len(self._running)

    async def shutdown(self, grace_seconds: float) -> None:
        """Give running replies a grace period to finish, then stop them; each stores itself."""
        tasks = [task for _, task in self._running.values()]
        if not tasks:
            return
        logger.info("waiting up to %gs for %d running replies", grace_seconds, len(tasks))
        pending = set(tasks)
        if grace_seconds > 0:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
        for message_id in list(self._running):
            await self.stop(message_id, StopReason.SHUTDOWN)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

"""Replies run as tasks owned by the service; HTTP responses only follow them.

A `Generation` buffers what the model has produced so far and wakes its followers on each
change, so any number of clients can follow one reply and a client that goes away costs the
reply nothing. The registry is in-process; its interface is what a shared one would offer.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    end: int
    """Characters delivered once this delta is applied."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a reply ended: the stored message, and the problem document if it failed."""

    message: dict[str, Any]
    problem: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    """Response headers that go with the problem (Retry-After on a 429)."""


class Generation:
    def __init__(self, message_id: uuid.UUID, conversation_id: uuid.UUID, user_id: str) -> None:
        self.message_id = message_id
        self.conversation_id = conversation_id
        self.user_id = user_id
        self._pieces: list[str] = []
        self._ends: list[int] = []
        self._outcome: Outcome | None = None
        self._changed = asyncio.Event()

    @property
    def content(self) -> str:
        return "".join(self._pieces)

    @property
    def length(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def append(self, text: str) -> None:
        self._pieces.append(text)
        self._ends.append(self.length + len(text))
        self._notify()

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

    async def follow(self) -> AsyncIterator[Delta | Outcome]:
        """Every delta in order, as it arrives, then the outcome."""
        index = 0
        while True:
            changed = self._changed
            while index < len(self._pieces):
                yield Delta(self._pieces[index], self._ends[index])
                index += 1
            if self._outcome is not None:
                yield self._outcome
                return
            await changed.wait()


class GenerationRegistry:
    """The running replies of this process."""

    def __init__(self) -> None:
        self._running: dict[uuid.UUID, tuple[Generation, asyncio.Task[None]]] = {}

    def start(self, generation: Generation, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"generation-{generation.message_id}")
        self._running[generation.message_id] = (generation, task)
        task.add_done_callback(lambda _: self._running.pop(generation.message_id, None))

    def get(self, message_id: uuid.UUID) -> Generation | None:
        entry = self._running.get(message_id)
        return entry[0] if entry else None

    def __len__(self) -> int:
        return len(self._running)

    async def shutdown(self) -> None:
        """Stop what is still running; each reply stores itself as it ends."""
        tasks = [task for _, task in self._running.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            logger.info("stopping %d running replies", len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)

"""The replies this process produces: each a task owned by the service, never by a request, so
any number of clients can follow one and a client that goes away costs it nothing."""

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any

from chatbot.replies.bus import LiveBus
from chatbot.replies.items import StopReason
from chatbot.replies.live import LiveReply, ReplyRef

logger = logging.getLogger(__name__)


class ReplyRegistry:
    def __init__(self, bus: LiveBus) -> None:
        self.bus = bus
        self._running: dict[uuid.UUID, tuple[LiveReply, asyncio.Task[None]]] = {}

    def open(self, ref: ReplyRef, seq: int) -> LiveReply:
        """A reply about to start here, on the bus already."""
        channel = self.bus.open(
            ref.message_id, lambda reason: self._stop_here(ref.message_id, reason)
        )
        return LiveReply(ref, seq, channel)

    def start(self, reply: LiveReply, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"reply-{reply.message_id}")
        self._running[reply.message_id] = (reply, task)
        task.add_done_callback(lambda _: self._ended(reply))

    def _ended(self, reply: LiveReply) -> None:
        self._running.pop(reply.message_id, None)
        reply.close()

    def get(self, message_id: uuid.UUID) -> LiveReply | None:
        entry = self._running.get(message_id)
        return entry[0] if entry else None

    def running(self) -> list[LiveReply]:
        return [reply for reply, _ in self._running.values()]

    def __len__(self) -> int:
        return len(self._running)

    async def stop(self, message_id: uuid.UUID, reason: StopReason) -> bool:
        """Stop a reply wherever it runs; it stores itself with a status that fits the reason.
        False when no producer holds it. One already being stored is left to finish."""
        if message_id in self._running:
            self._stop_here(message_id, reason)
            return True
        return await self.bus.stop(message_id, reason)

    def _stop_here(self, message_id: uuid.UUID, reason: StopReason) -> None:
        entry = self._running.get(message_id)
        if entry is not None and entry[0].request_stop(reason):
            entry[1].cancel()

    async def shutdown(self, grace_seconds: float) -> None:
        """Give running replies a grace period to finish, then stop them; each stores itself,
        within a second grace period for its store."""
        tasks = [task for _, task in self._running.values()]
        if not tasks:
            return
        logger.info("waiting up to %gs for %d running replies", grace_seconds, len(tasks))
        pending = set(tasks)
        if grace_seconds > 0:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
        for message_id in list(self._running):
            self._stop_here(message_id, StopReason.SHUTDOWN)
        if not pending:
            return
        _, unstored = await asyncio.wait(pending, timeout=max(grace_seconds, 1.0))
        for task in unstored:
            # A store still retrying a database that does not answer: nothing more can be done.
            logger.error(
                "stopping with reply %s not stored", task.get_name().removeprefix("reply-")
            )
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

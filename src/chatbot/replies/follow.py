"""Following a reply from any position: live from the bus, or from the database."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.messages import repository as messages
from chatbot.messages.models import MessageStatus
from chatbot.replies.bus import LiveBus, OffBus
from chatbot.replies.items import Batch, Outcome, items_after
from chatbot.replies.outcomes import gone, stored_items, stored_outcome
from chatbot.replies.registry import ReplyRegistry

FIRST_POLL_SECONDS = 0.05
"""A reply whose turn was just committed elsewhere is on the bus within its producer's first
flush: the bus is asked again this soon, then at the checkpoint pace."""


class ReplyFollower:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        registry: ReplyRegistry,
        bus: LiveBus,
        poll_seconds: float,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._registry = registry
        self._bus = bus
        self._poll_seconds = poll_seconds

    async def events(
        self, message_id: uuid.UUID, starting_after: int = 0
    ) -> AsyncIterator[Batch | Outcome]:
        """The reply from position `starting_after` on, then its outcome.

        A reply on the live bus is followed item by item. Otherwise the database has it:
        finished (replayed at once) or running where the bus does not reach, which
        checkpoints it every few seconds (followed at that pace). A bus that loses the reply
        midway (its producer died, or the bus cannot be reached) hands over to the database
        where it left off, and the bus is asked again at every poll: a reply that just
        started elsewhere, or a bus that answers again, is followed live from there on.
        """
        delivered = starting_after
        pause = FIRST_POLL_SECONDS
        while True:
            try:
                async with aclosing(self._bus.follow(message_id, delivered)) as live:
                    async for item in live:
                        yield item
                        if isinstance(item, Outcome):
                            return
                        delivered = item[-1].end
            except OffBus:
                pass
            async with self._sessionmaker() as session:
                message = await messages.get(session, message_id)
                turn = await messages.turn_of(session, message) if message else []
            if message is None:
                yield gone(message_id)
                return
            if fresh := items_after(stored_items(turn, message), delivered):
                yield tuple(fresh)
                delivered = fresh[-1].end
            if message.status is not MessageStatus.IN_PROGRESS:
                yield stored_outcome(message, turn)
                return
            await asyncio.sleep(pause)
            pause = self._poll_seconds

    async def outcome(self, message_id: uuid.UUID) -> Outcome:
        reply = self._registry.get(message_id)
        if reply is not None:
            return await reply.wait()
        async for item in self.events(message_id):
            if isinstance(item, Outcome):
                return item
        raise AssertionError("every reply stream ends with an outcome")

"""The one owner of replies: what starts, stops, follows and keeps them.

A turn adds the reply's row in its own transaction (`repository.add_turn`) and, once that is
committed, starts it (`start`); the reply then runs as a task of the service while any number
of clients follow it (`follow`, `outcome`) and anyone may stop it (`stop`, `cancel`)."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.config import Settings
from chatbot.context.chores import FollowUp
from chatbot.context.tokens import TokenCounter
from chatbot.db import utcnow
from chatbot.llm.client import LLMClient
from chatbot.messages.models import Message, MessageStatus
from chatbot.replies import repository
from chatbot.replies.bus import InProcessBus, LiveBus
from chatbot.replies.follow import ReplyFollower
from chatbot.replies.items import Batch, Outcome, StopReason
from chatbot.replies.keeper import SWEEP_EVERY, ReplyKeeper
from chatbot.replies.live import ReplyRef
from chatbot.replies.redis_bus import RedisBus
from chatbot.replies.registry import ReplyRegistry
from chatbot.replies.runner import ReplyJob, ReplyRunner
from chatbot.replies.status import Mover
from chatbot.replies.store import ReplyStore

MISSED_CHECKPOINTS = 3
"""With a bus that tracks producers: how many checkpoints a producer whose lease lapsed must
also have missed before its replies count as abandoned."""


class Replies:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        llm: LLMClient,
        counter: TokenCounter,
        *,
        bus: LiveBus | None = None,
        after_reply: Callable[[FollowUp, int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self.bus = bus or _bus_for(settings)
        self.registry = ReplyRegistry(self.bus)
        self.store = ReplyStore(sessionmaker, counter, retry_seconds=settings.store_retry_seconds)
        self.runner = ReplyRunner(settings, sessionmaker, llm, counter, self.store, after_reply)
        self.follower = ReplyFollower(
            sessionmaker, self.registry, self.bus, settings.checkpoint_seconds
        )
        # A bus that reaches every instance knows their producers' leases: a dead one's
        # replies are stored once its lease has lapsed and it missed a few checkpoints (a
        # live producer that Redis lost sight of still checkpoints), swept at every
        # checkpoint; while the bus cannot be reached, as without it.
        lease = self.bus.lease_seconds
        self.keeper = ReplyKeeper(
            sessionmaker,
            self.registry,
            self.bus,
            interval_seconds=settings.checkpoint_seconds,
            stale_after_seconds=(
                max(lease, MISSED_CHECKPOINTS * settings.checkpoint_seconds)
                if lease
                else settings.stale_reply_seconds
            ),
            unknown_stale_after_seconds=settings.stale_reply_seconds,
            sweep_every=1 if lease else SWEEP_EVERY,
        )
        self._keeping: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Sweep what a process before this one left, then keep checkpointing and sweeping."""
        await self.bus.start()
        await self.keeper.sweep()
        self._keeping = asyncio.create_task(self.keeper.run(), name="reply-keeper")

    async def aclose(self) -> None:
        """Let running replies finish (a grace period), stop the rest; each stores itself."""
        await self.registry.shutdown(self._settings.shutdown_grace_seconds)
        if self._keeping is not None:
            self._keeping.cancel()
            await asyncio.gather(self._keeping, return_exceptions=True)
        await self.bus.aclose()

    def start(self, ref: ReplyRef, seq: int, job: ReplyJob) -> None:
        """Generate the reply whose row the turn committed."""
        reply = self.registry.open(ref, seq)
        self.registry.start(reply, self.runner.run(reply, job))

    async def stop(self, message_id: uuid.UUID, reason: StopReason) -> bool:
        return await self.registry.stop(message_id, reason)

    async def cancel(self, message: Message, user_id: str) -> Outcome:
        """Stop a reply at once, keeping its partial text as `cancelled`; harmless when it has
        ended already. One that no producer holds is ended with its last checkpoint."""
        if message.status is MessageStatus.IN_PROGRESS and not await self.stop(
            message.id, StopReason.CANCELLED
        ):
            ref = ReplyRef(message.id, message.conversation_id, user_id)
            values = {"status": MessageStatus.CANCELLED, "completed_at": utcnow()}
            async with self._sessionmaker() as session:
                await repository.finish(session, ref, Mover.CANCEL, values)
                await session.commit()
        return await self.follower.outcome(message.id)

    def follow(self, message_id: uuid.UUID, after: int = 0) -> AsyncIterator[Batch | Outcome]:
        return self.follower.events(message_id, after)

    async def outcome(self, message_id: uuid.UUID) -> Outcome:
        return await self.follower.outcome(message_id)

    def followers(self, message_id: uuid.UUID) -> int:
        """Clients following the reply live here right now."""
        return self.bus.followers(message_id)


def _bus_for(settings: Settings) -> LiveBus:
    """Redis when REDIS_URL is set (replies live across instances), else this process."""
    if settings.redis_url is None:
        return InProcessBus()
    return RedisBus(
        settings.redis_url,
        lease_seconds=settings.reply_lease_seconds,
        ttl_seconds=settings.redis_reply_ttl_seconds,
        flush_seconds=settings.redis_flush_ms / 1000,
    )

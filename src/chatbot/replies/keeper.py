"""Keeps the database's view of running replies true: checkpoints and the sweep.

Every few seconds the text of each running reply of this process is saved (so a crash loses at
most that much) and the replies are marked alive. Replies nobody has marked alive for a while,
and whose producer the live bus does not know, belong to a dead process: the sweep stores them
`incomplete` and frees their conversations. Both are statements over many rows, so several
instances run them side by side.
"""

import asyncio
import logging
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.db import is_unreachable, utcnow
from chatbot.replies import repository
from chatbot.replies.bus import LiveBus
from chatbot.replies.errors import Interrupted
from chatbot.replies.items import StopReason
from chatbot.replies.live import Snapshot
from chatbot.replies.registry import ReplyRegistry

logger = logging.getLogger(__name__)

SWEEP_EVERY = 5
"""Checkpoints per sweep."""


class ReplyKeeper:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        registry: ReplyRegistry,
        bus: LiveBus,
        *,
        interval_seconds: float,
        stale_after_seconds: float,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._registry = registry
        self._bus = bus
        self._interval = interval_seconds
        self._stale_after = stale_after_seconds
        # Starting up, the database is taken to have answered all along (others' producers
        # have been marking their replies alive); an outage seen here resets it.
        self._reachable_since: float | None = time.monotonic() - stale_after_seconds

    async def run(self) -> None:
        """Checkpoint every interval and sweep every few; errors are logged, never fatal."""
        rounds = 0
        while True:
            await asyncio.sleep(self._interval)
            rounds += 1
            try:
                await self.checkpoint()
                if rounds % SWEEP_EVERY == 0:
                    await self.sweep()
            except Exception as exc:
                if not is_unreachable(exc):
                    logger.exception("reply checkpoint failed; retrying in %gs", self._interval)
                    continue
                if self._reachable_since is not None:  # said once per outage
                    logger.warning(
                        "the database is unreachable (%s); checkpoints resume when it answers",
                        type(exc).__name__,
                    )
                self._reachable_since = None

    async def checkpoint(self) -> None:
        running = [reply for reply in self._registry.running() if not reply.finishing]
        finishing = [reply for reply in self._registry.running() if reply.finishing]
        if not running and not finishing:
            return
        now = utcnow()
        snapshots = [snapshot for reply in running if (snapshot := reply.unsaved())]
        # First, that they are alive: ids only, which no reply's text can spoil. A reply
        # whose end is still being stored is alive too, or another instance would sweep it.
        async with self._sessionmaker() as session:
            still_running = await repository.mark_alive(
                session, [reply.message_id for reply in [*running, *finishing]], now
            )
            await session.commit()
        self._answered()
        saved = await self._save(snapshots, now)
        by_id = {reply.message_id: reply for reply in running}
        for snapshot in saved:
            by_id[snapshot.message_id].saved(snapshot)
        # Finished elsewhere: cancelled on another instance, swept, or deleted with its
        # conversation. Replies that started storing themselves meanwhile are left alone.
        for reply in running:
            if reply.message_id not in still_running and not reply.finishing:
                logger.info("reply %s was finished elsewhere; stopping it here", reply.message_id)
                await self._registry.stop(reply.message_id, StopReason.SUPERSEDED)

    async def _save(self, snapshots: list[Snapshot], now: datetime) -> list[Snapshot]:
        """Save the texts in one statement; if that fails, one reply at a time (each text
        made storable), so that one that cannot be saved never holds the others back.
        Returns those saved."""
        if not snapshots:
            return []
        try:
            async with self._sessionmaker() as session:
                await repository.save_contents(session, snapshots, now)
                await session.commit()
            return snapshots
        except Exception as exc:
            if is_unreachable(exc):
                raise
            logger.warning(
                "checkpoint of %d replies failed (%s); saving them one at a time",
                len(snapshots),
                type(exc).__name__,
            )
        saved = []
        for snapshot in snapshots:
            try:
                async with self._sessionmaker() as session:
                    await repository.save_contents(session, [snapshot.storable()], now)
                    await session.commit()
            except Exception as exc:
                if is_unreachable(exc):
                    raise
                logger.warning(
                    "could not checkpoint reply %s (%s)", snapshot.message_id, type(exc).__name__
                )
                continue
            saved.append(snapshot)
        return saved

    def _answered(self) -> None:
        if self._reachable_since is None:
            self._reachable_since = time.monotonic()
            logger.info("the database answers again; checkpoints resumed")

    async def sweep(self) -> list[uuid.UUID]:
        """Store replies a dead process abandoned as `incomplete`.

        Not until the database has answered for a whole stale period: after an outage every
        live producer needs that long to mark its replies alive again."""
        now = utcnow()
        stale_before = now - timedelta(seconds=self._stale_after)
        async with self._sessionmaker() as session:
            stale = await repository.stale(session, stale_before)
            self._answered()
            assert self._reachable_since is not None
            if time.monotonic() - self._reachable_since < self._stale_after:
                return []
            local = {reply.message_id for reply in self._registry.running()}
            alive = local | await self._bus.alive(stale)
            abandoned = [message_id for message_id in stale if message_id not in alive]
            if abandoned:
                abandoned = await repository.abandon(
                    session,
                    abandoned,
                    stale_before=stale_before,
                    error=Interrupted().stored(),
                    now=now,
                )
            await session.commit()
        if abandoned:
            logger.warning("marked %d abandoned replies incomplete", len(abandoned))
        return abandoned

"""Keeps the database's view of running replies true: checkpoints and the sweep.

Every few seconds the text of each running reply of this process is saved (so a crash loses at
most that much) and the replies are marked alive. Replies nobody has marked alive for a while,
and whose producer the live bus does not know, belong to a dead process: the sweep stores them
`incomplete`, with all the text the bus still holds of them when it holds it, and frees their
conversations. Both are statements over many rows, so several instances run them side by side.
"""

import asyncio
import logging
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.db import is_unreachable, utcnow
from chatbot.messages import repository as messages
from chatbot.replies import repository
from chatbot.replies.bus import BusUnavailable, LiveBus
from chatbot.replies.errors import Interrupted
from chatbot.replies.items import Item, StopReason, ToolEvent, round_text
from chatbot.replies.live import Snapshot
from chatbot.replies.outcomes import stored_items
from chatbot.replies.registry import ReplyRegistry
from chatbot.sanitize import clean_text

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
        unknown_stale_after_seconds: float | None = None,
        sweep_every: int = SWEEP_EVERY,
    ) -> None:
        """`stale_after_seconds` without a checkpoint (and, when the bus tracks producers, a
        lapsed lease) makes a reply abandoned; `unknown_stale_after_seconds` when the bus
        cannot say whether producers live."""
        self._sessionmaker = sessionmaker
        self._registry = registry
        self._bus = bus
        self._interval = interval_seconds
        self._stale_after = stale_after_seconds
        self._unknown_stale_after = unknown_stale_after_seconds or stale_after_seconds
        self._sweep_every = sweep_every
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
                if rounds % self._sweep_every == 0:
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
            try:
                alive = local | await self._bus.alive(stale)
            except BusUnavailable:
                # Whether their producers live is unknown: only checkpoints can tell, as
                # when the bus does not reach other instances, over a longer period.
                stale_before = now - timedelta(seconds=self._unknown_stale_after)
                stale = await repository.stale(session, stale_before)
                alive = local
            abandoned = [message_id for message_id in stale if message_id not in alive]
            if abandoned:
                abandoned = await repository.abandon(
                    session,
                    abandoned,
                    stale_before=stale_before,
                    error=Interrupted().stored(),
                    now=now,
                    contents=await self._published(session, abandoned),
                )
            await session.commit()
        if abandoned:
            logger.warning("marked %d abandoned replies incomplete", len(abandoned))
        return abandoned

    async def _published(
        self, session: AsyncSession, message_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, str]:
        """The text of the replies' last rounds as their producers published it on the bus,
        where the bus holds more of it than the last checkpoint did."""
        contents = {}
        for message_id in message_ids:
            published = await self._bus.remains(message_id)
            message = await messages.get(session, message_id) if published else None
            if published is None or message is None:
                continue
            if text := _more_than_stored(
                published,
                stored_items(await messages.turn_of(session, message), message),
                message.content,
            ):
                contents[message_id] = clean_text(text)
        return contents


def _more_than_stored(published: list[Item], stored: list[Item], content: str) -> str | None:
    """The text of the published last round, when it continues what is stored: the same tool
    rounds, and the stored text as its start."""
    events = sum(isinstance(item, ToolEvent) for item in published)
    if events != sum(isinstance(item, ToolEvent) for item in stored):
        return None  # a round stored or published without the other: the checkpoint holds
    text = round_text(published)
    return text if len(text) > len(content) and text.startswith(content) else None

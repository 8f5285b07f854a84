"""Per-user limits: request rate, concurrent replies, and daily tokens.

The request rate is counted in fixed windows, in memory by default and in Redis (through
`limits`) when REDIS_URL is set, so the limit holds across instances. Concurrent replies and
daily tokens are counted in the database, which every instance shares anyway, under the user's
turn lock (`conversations.claim_reply`, `hold_reply`): each call to the model reserves what it
may cost at most, its prompt and a `max_tokens` no larger than what the day has left after the
other running replies' reservations, so running replies together never spend more than the
quota (give or take the provider's count of the prompt).
"""

import functools
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

from limits import RateLimitItem, parse, storage
from limits.aio.strategies import FixedWindowRateLimiter
from sqlalchemy import (
    Date,
    Insert,
    Integer,
    String,
    Table,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.config import Settings
from chatbot.conversations import repository as conversations
from chatbot.conversations.models import Conversation
from chatbot.errors import TooManyRequests
from chatbot.quotas.models import DailyUsage

logger = logging.getLogger(__name__)


class TooManyReplies(TooManyRequests):
    code = "too_many_replies"


class QuotaExceeded(TooManyRequests):
    code = "quota_exceeded"


class TooManyStreams(TooManyRequests):
    code = "too_many_streams"


class OpenStreams:
    """The streams open in this process, per user. Following a reply (or resuming a turn's
    stream) is refused past CHATBOT_MAX_STREAMS_PER_USER; a turn's own stream always opens,
    the running-replies cap bounds those, and it counts."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def open(self, user_id: str, *, refusable: bool = True) -> Callable[[], None]:
        """Count a stream; returns what to call, once, when it closes."""
        count = self._open.get(user_id, 0)
        if refusable and count >= self._limit:
            raise TooManyStreams(
                f"At most {self._limit} streams may be open at once", headers=_retry_after(1)
            )
        self._open[user_id] = count + 1
        closed = False

        def close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            left = self._open.get(user_id, 1) - 1
            if left > 0:
                self._open[user_id] = left
            else:
                self._open.pop(user_id, None)

        return close

    def count(self, user_id: str) -> int:
        return self._open.get(user_id, 0)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class FixedWindows:
    """Requests per user in fixed windows of `period` seconds, each opened by the user's first
    request after the last one closed (as `limits` counts them in Redis), in this process.

    A request costs a lookup or two whatever the number of users: windows are kept in two
    generations of `period` seconds each, and a generation is dropped whole once every window
    in it has closed. (`limits`' memory storage swept its expired keys after every hit, at a
    cost that grew with the users: 28.7 ms of CPU a request at 1,000 of them.)"""

    def __init__(self, amount: int, period: float, clock: Callable[[], float] = time.monotonic):
        self._amount = amount
        self._period = period
        self._clock = clock
        self._generation = 0
        self._current: dict[str, list[float]] = {}
        """Windows [opened at, requests] touched in this generation."""
        self._previous: dict[str, list[float]] = {}

    def hit(self, user_id: str) -> float | None:
        """Count a request: None when admitted, else the seconds until its window closes."""
        now = self._clock()
        generation = int(now // self._period)
        if generation != self._generation:
            # A window opened before the previous generation has closed by now.
            self._previous = self._current if generation == self._generation + 1 else {}
            self._current, self._generation = {}, generation
        window = self._current.get(user_id)
        if window is None:
            window = self._previous.pop(user_id, None)
            if window is not None:
                self._current[user_id] = window
        if window is None or now >= window[0] + self._period:
            window = self._current[user_id] = [now, 0]
        if window[1] >= self._amount:
            return window[0] + self._period - now
        window[1] += 1
        return None


class RequestRateLimiter:
    def __init__(self, settings: Settings) -> None:
        self._item: RateLimitItem | None = (
            parse(settings.rate_limit) if settings.rate_limit else None
        )
        self._memory: FixedWindows | None = None
        self._limiter: FixedWindowRateLimiter | None = None
        self._storage: object = None
        if self._item is not None and not settings.redis_url:
            self._memory = FixedWindows(self._item.amount, self._item.get_expiry())
        elif self._item is not None and settings.redis_url:
            redis = storage.storage_from_string(
                "async+" + settings.redis_url, implementation="redispy"
            )
            # The same fixed windows, counted in Redis: one INCR (and EXPIRE) a request.
            self._limiter = FixedWindowRateLimiter(redis)
            self._storage = redis
        self._storage_answers = True

    async def admit(self, user_id: str) -> None:
        """Count a request; 429 with Retry-After past the limit. Fails open if Redis is down."""
        if self._memory is not None:
            wait = self._memory.hit(user_id)
            if wait is not None:
                raise self._refused(wait)
            return
        if self._item is None or self._limiter is None:
            return
        try:
            admitted = await self._limiter.hit(self._item, "requests", user_id)
            stats = (
                None
                if admitted
                else await self._limiter.get_window_stats(self._item, "requests", user_id)
            )
        except Exception as exc:
            if self._storage_answers:  # once per outage, not once per request
                self._storage_answers = False
                logger.warning(
                    "rate limit storage unavailable (%s); admitting requests until it answers",
                    type(exc).__name__,
                )
            return
        if not self._storage_answers:
            self._storage_answers = True
            logger.info("rate limit storage answers again")
        if stats is not None:
            raise self._refused(stats.reset_time - time.time())

    def _refused(self, wait: float) -> TooManyRequests:
        return TooManyRequests(
            f"Too many requests: the limit is {self._item}", headers=_retry_after(wait)
        )

    async def aclose(self) -> None:
        # limits offers no close(); its Redis bridge keeps the redis-py client as `storage`.
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        if client is not None and hasattr(client, "aclose"):
            await client.aclose()


def _today() -> date:
    return datetime.now(UTC).date()


def _until_midnight() -> float:
    now = datetime.now(UTC)
    tomorrow = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (tomorrow - now).total_seconds()


def too_many_replies(settings: Settings) -> TooManyReplies:
    return TooManyReplies(
        f"At most {settings.max_concurrent_replies} replies may run at once",
        headers=_retry_after(1),
    )


MIN_REPLY_TOKENS = 16
"""A call is not worth making with room for fewer tokens than this (or than the client asked
for): it would end cut short, or empty for a reasoning model, and cost the turn."""


async def admit_call(
    session: AsyncSession,
    settings: Settings,
    *,
    user_id: str,
    conversation_id: uuid.UUID,
    prompt_tokens: int,
    max_output_tokens: int | None,
) -> int | None:
    """Before each call to the model, in a transaction that holds the user's turn lock: the
    `max_tokens` the call must carry, its cost reserved on the conversation. 429 when what
    the day has left cannot cover the prompt and a useful reply. Without a quota, or with room
    for everything the call may produce, what the client asked for (maybe nothing: the
    provider's own limit then applies). (The cap on running replies is applied where a
    conversation is claimed.)"""
    quota = settings.daily_token_quota
    if quota is None:
        return max_output_tokens
    # One statement, one snapshot: a reply that ends meanwhile moves its tokens from its
    # reservation to the day in one commit, and is counted once either way.
    used, reserved = (
        await session.execute(
            select(
                func.coalesce(
                    select(DailyUsage.total_tokens)
                    .where(DailyUsage.user_id == user_id, DailyUsage.day == _today())
                    .scalar_subquery(),
                    0,
                ),
                conversations.reserved_by_others(user_id, conversation_id).scalar_subquery(),
            )
        )
    ).one()
    asked = max_output_tokens or settings.max_output_tokens
    room = quota - used - reserved - prompt_tokens
    if room < min(asked, MIN_REPLY_TOKENS):
        running = f", {reserved} held by running replies" if reserved else ""
        raise QuotaExceeded(
            f"The daily quota of {quota} tokens is used up ({used} so far today{running})",
            headers=_retry_after(_until_midnight()),
        )
    allowed = min(asked, room)
    await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(reserved_tokens=prompt_tokens + allowed)
        .execution_options(synchronize_session=False)
    )
    return allowed if max_output_tokens is not None or allowed < asked else None


async def record_usage(session: AsyncSession, user_id: str, tokens: int) -> None:
    """Add a reply's tokens to the user's day, in the caller's transaction."""
    if tokens <= 0:
        return
    statement = usage_added(session.get_bind().dialect.name)
    await session.execute(statement, usage_parameters(user_id, tokens))


def usage_parameters(user_id: str, tokens: int) -> dict[str, Any]:
    """The parameters of `usage_added`: `tokens` more for the user today."""
    return {"owner": user_id, "today": _today(), "tokens": tokens}


@functools.cache
def usage_added(dialect: str) -> Insert:
    """The upsert that adds tokens to a user's day (none when there are none to add), built
    once per dialect; a statement of its own, or part of one (`replies.repository`)."""
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    days = cast(Table, DailyUsage.__table__)
    tokens = bindparam("tokens", type_=Integer)
    added = select(bindparam("owner", type_=String), bindparam("today", type_=Date), tokens)
    statement = insert(days).from_select(
        [days.c.user_id, days.c.day, days.c.total_tokens], added.where(tokens > 0)
    )
    return statement.on_conflict_do_update(
        index_elements=[days.c.user_id, days.c.day],
        set_={"total_tokens": days.c.total_tokens + statement.excluded.total_tokens},
    )

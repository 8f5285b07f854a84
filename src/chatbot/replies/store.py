"""A reply's stores, made to hold whatever the database does meanwhile.

A store that cannot reach the database is retried with backoff for up to
CHATBOT_STORE_RETRY_SECONDS, the reply kept in memory all that time; its conversation is freed
by the same transaction that stores its end, the moment that lands. A store the database refuses
for its values is not retried as it was: the provider's figures (usage, model, finish reason)
are left out, which costs those fields and never the text.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.context.tokens import TokenCounter
from chatbot.db import is_unreachable, utcnow
from chatbot.errors import AppError
from chatbot.llm.client import TokenUsage, ToolCall
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.messages.schemas import MessageOut
from chatbot.quotas import service as quotas
from chatbot.replies import repository
from chatbot.replies.errors import StorageFailed
from chatbot.replies.events import tool_error
from chatbot.replies.items import Outcome, StopReason
from chatbot.replies.live import LiveReply, ReplyRef
from chatbot.replies.outcomes import (
    gone,
    outcome_of,
    stored_outcome,
    unreadable,
    without_end,
)
from chatbot.replies.rounds import ToolRound
from chatbot.replies.status import Mover, failed_or_incomplete
from chatbot.sanitize import clean_text

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

FIRST_RETRY_SECONDS = 0.1
LONGEST_RETRY_SECONDS = 5.0


class Superseded(Exception):
    """The reply lost its conversation mid-turn: cancelled elsewhere, swept, or deleted."""


@dataclass(frozen=True, slots=True)
class Ending:
    """How a reply ended, as its row will hold it."""

    status: MessageStatus
    content: str
    token_count: int
    latency_ms: int
    ttft_ms: int | None
    completed_at: datetime
    error: AppError | None = None
    finish_reason: str | None = None
    model: str | None = None
    usage: TokenUsage | None = None

    def values(self, *, provider_figures: bool = True) -> dict[str, Any]:
        """The row's new values; without the provider's figures, the fallback when the
        database refused them (with the text made storable again, should any have come in
        some other way than through a client that cleans it)."""
        values: dict[str, Any] = {
            "content": self.content if provider_figures else clean_text(self.content),
            "token_count": self.token_count,
            "status": self.status,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "completed_at": self.completed_at,
            "error": self.error.stored() if self.error else None,
        }
        if provider_figures:
            values["finish_reason"] = self.finish_reason
            if self.model:
                values["model"] = self.model
            if self.usage is not None:
                values["prompt_tokens"] = self.usage.prompt_tokens
                values["completion_tokens"] = self.usage.completion_tokens
                values["total_tokens"] = self.usage.total_tokens
                values["usage_estimated"] = self.usage.estimated
        return values


class ReplyStore:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        counter: TokenCounter,
        *,
        retry_seconds: float,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._counter = counter
        self._retry_seconds = retry_seconds

    async def retrying(self, reply: LiveReply, what: str, store: Callable[[], Awaitable[_T]]) -> _T:
        """Run a store, again and again with backoff while the database cannot be reached, for
        up to the retry bound; then, or on any other failure, the failure is raised."""
        deadline = time.monotonic() + self._retry_seconds
        delay = FIRST_RETRY_SECONDS
        attempts = 0
        while True:
            attempts += 1
            try:
                result = await store()
            except Exception as exc:
                if not is_unreachable(exc) or time.monotonic() + delay > deadline:
                    raise
                if attempts == 1:  # said once, not at every attempt
                    logger.warning(
                        "the database did not take %s of reply %s (%s); keeping it and "
                        "retrying for up to %g s",
                        what,
                        reply.message_id,
                        type(exc).__name__,
                        self._retry_seconds,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, LONGEST_RETRY_SECONDS)
                continue
            if attempts > 1:
                logger.info(
                    "stored %s of reply %s after %d attempts", what, reply.message_id, attempts
                )
            return result

    # --- tool rounds --------------------------------------------------------------------------

    async def store_calls(
        self,
        reply: LiveReply,
        calls: tuple[ToolCall, ...],
        *,
        model: str,
        served_by: str | None,
        unrecorded_tokens: int,
    ) -> None:
        """Store the message that called tools in the reply's place, with the tokens its call
        cost; raises Superseded when the reply lost its conversation."""
        text = reply.content
        seq = reply.seq
        # Chosen once: a retry after a commit that landed though it reported a failure (a
        # connection lost during COMMIT) finds the row instead of writing the round twice.
        calling_id = uuid.uuid4()
        attempts = 0

        async def store() -> None:
            nonlocal attempts
            attempts += 1
            now = utcnow()
            async with self._sessionmaker() as session:
                if attempts > 1 and await session.get(Message, calling_id) is not None:
                    return
            calling = Message(
                id=calling_id,
                conversation_id=reply.ref.conversation_id,
                seq=seq,
                role=Role.ASSISTANT,
                content=text,
                token_count=self._counter.count_text(text, model),
                status=MessageStatus.COMPLETED,
                model=served_by,
                finish_reason="tool_calls",
                tool_calls=[call.to_openai() for call in calls],
                created_at=now,
                completed_at=now,
            )
            async with self._sessionmaker() as session:
                stored = await repository.store_calls(
                    session, reply.ref, seq=seq, calling=calling, results=len(calls)
                )
                if not stored:
                    raise Superseded()
                await quotas.record_usage(session, reply.ref.user_id, unrecorded_tokens)
                await session.commit()

        await self.retrying(reply, "the tool calls", store)

    async def store_results(self, reply: LiveReply, round_: ToolRound) -> None:
        """One tool message per call: a call without its result would make the conversation
        unsendable."""

        ids = [uuid.uuid4() for _ in round_.calls]  # chosen once, as in store_calls
        attempts = 0

        async def store() -> None:
            nonlocal attempts
            attempts += 1
            now = utcnow()
            async with self._sessionmaker() as session:
                if attempts > 1 and await session.get(Message, ids[0]) is not None:
                    return
                repository.add_tool_results(
                    session,
                    [
                        self._result_message(reply.ref, round_, index, call, now, ids[index])
                        for index, call in enumerate(round_.calls)
                    ],
                )
                try:
                    await session.commit()
                except IntegrityError:
                    raise Superseded() from None  # the conversation was deleted meanwhile

        await self.retrying(reply, "the tool results", store)

    def _result_message(
        self,
        ref: ReplyRef,
        round_: ToolRound,
        index: int,
        call: ToolCall,
        now: datetime,
        message_id: uuid.UUID,
    ) -> Message:
        result = round_.results[call.id]
        return Message(
            id=message_id,
            conversation_id=ref.conversation_id,
            seq=round_.first_seq + index,
            role=Role.TOOL,
            content=result.content,
            token_count=self._counter.count_text(result.content, round_.model),
            status=MessageStatus.COMPLETED,
            tool_call_id=call.id,
            error=tool_error(result.content) if result.status == "error" else None,
            created_at=now,
            completed_at=now,
        )

    # --- the end ------------------------------------------------------------------------------

    async def finish(
        self,
        reply: LiveReply,
        ending: Ending,
        *,
        tokens: int,
        tool_calls: list[dict[str, Any]],
    ) -> Outcome:
        """Store the reply's end, free its conversation and add `tokens` to the user's day;
        returns the outcome its followers get. A reply superseded meanwhile (or found final)
        is read back as it was stored."""
        if reply.stop_reason is StopReason.SUPERSEDED:
            await self._record_spent(reply, tokens)
            return await self._read_back(reply.message_id, ending.error)
        attempts = 0

        async def store() -> Message | None:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and (landed := await self._landed(reply, ending)) is not None:
                return landed
            return await self._finish_once(reply, ending, tokens)

        try:
            stored = await self.retrying(reply, "the end", store)
        except Exception:
            logger.exception("could not store reply %s", reply.message_id)
            return await self._not_stored(reply)
        if stored is None:  # finished elsewhere, or gone
            return await self._read_back(reply.message_id, ending.error)
        headers = ending.error.headers if ending.error else None
        return outcome_of(stored, headers=headers, tool_calls=tool_calls)

    async def _landed(self, reply: LiveReply, ending: Ending) -> Message | None:
        """The reply's row if an earlier attempt's commit landed though it reported a failure
        (its end time is this ending's own), so that neither the end nor its tokens are
        written twice."""
        async with self._sessionmaker() as session:
            row = await messages.get(session, reply.message_id)
        if row is not None and row.completed_at == ending.completed_at:
            return row
        return None

    async def _finish_once(self, reply: LiveReply, ending: Ending, tokens: int) -> Message | None:
        try:
            return await self._commit_end(reply, ending.values(), tokens)
        except Exception as exc:
            if is_unreachable(exc):
                raise
            logger.warning(
                "reply %s: the database refused its values (%s); storing it without the "
                "provider's figures",
                reply.message_id,
                type(exc).__name__,
            )
        return await self._commit_end(reply, ending.values(provider_figures=False), tokens)

    async def _commit_end(
        self, reply: LiveReply, values: dict[str, Any], tokens: int
    ) -> Message | None:
        async with self._sessionmaker() as session:
            if session.get_bind().dialect.name == "postgresql":
                stored = await repository.finish_at_once(
                    session, reply.ref, Mover.RUNNER, values, tokens=tokens
                )
            else:
                stored = await repository.finish(session, reply.ref, Mover.RUNNER, values)
                await quotas.record_usage(session, reply.ref.user_id, tokens)
            # After finish_at_once, nothing for the database to commit (the statement was a
            # transaction of its own); it ends the session's.
            await session.commit()
        return stored

    async def _not_stored(self, reply: LiveReply) -> Outcome:
        """The end could not be stored within the bound: one last try with the text alone,
        marked failed, to free the conversation if the database takes that."""
        error = StorageFailed()
        values = {
            "content": clean_text(reply.content),
            "status": failed_or_incomplete(bool(reply.content)),
            "error": error.stored(),
            "completed_at": utcnow(),
        }
        try:
            async with self._sessionmaker() as session:
                await repository.finish(session, reply.ref, Mover.RUNNER, values)
                await session.commit()
        except Exception:
            # The sweep frees the conversation once this reply's checkpoints are stale.
            logger.exception("could not mark reply %s as failed", reply.message_id)
        return await self._read_back(reply.message_id, error)

    async def _record_spent(self, reply: LiveReply, tokens: int) -> None:
        """A reply finished elsewhere still spent what its last call cost."""
        try:
            async with self._sessionmaker() as session:
                await quotas.record_usage(session, reply.ref.user_id, tokens)
                await session.commit()
        except Exception:
            logger.exception("could not record the tokens of reply %s", reply.message_id)

    async def _read_back(self, message_id: uuid.UUID, error: AppError | None) -> Outcome:
        try:
            async with self._sessionmaker() as session:
                stored = await messages.get(session, message_id)
                turn = await messages.turn_of(session, stored) if stored else []
        except Exception:
            logger.exception("could not read back reply %s", message_id)
            return unreadable(message_id)
        if stored is None:
            return gone(message_id, error)
        if stored.status is MessageStatus.IN_PROGRESS:  # its end never reached the database
            return without_end(
                message_id,
                error or StorageFailed(),
                message=MessageOut.of(stored).model_dump(mode="json"),
            )
        return stored_outcome(stored, turn, headers=error.headers if error else None)

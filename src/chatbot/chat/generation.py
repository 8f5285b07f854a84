"""Generating one reply: a task of the service that streams from the model and stores the end."""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.config import Settings
from chatbot.context.chores import FollowUp
from chatbot.context.tokens import TokenCounter
from chatbot.conversations import repository as conversations
from chatbot.db import utcnow
from chatbot.errors import AppError, UpstreamError
from chatbot.llm.client import Completion, CompletionRequest, LLMClient
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus
from chatbot.quotas import service as quotas
from chatbot.streams.follow import outcome_of
from chatbot.streams.registry import Generation, Outcome, StopReason

logger = logging.getLogger(__name__)

STORE_RETRY_DELAYS = (0.2, 1.0, 3.0)
"""Pauses between attempts to store a finished reply before giving up on it."""


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


class ReplyRunner:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        llm: LLMClient,
        counter: TokenCounter,
        after_reply: Callable[[FollowUp, int], None] | None = None,
        store_retry_delays: tuple[float, ...] = STORE_RETRY_DELAYS,
    ) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._llm = llm
        self._counter = counter
        self._after_reply = after_reply
        self._store_retry_delays = store_retry_delays

    async def run(
        self,
        generation: Generation,
        request: CompletionRequest,
        started: float,
        follow_up: FollowUp | None = None,
    ) -> None:
        """Runs as a task of its own: no request, and no database session, is held meanwhile."""
        ttft_ms: int | None = None
        completion: Completion | None = None
        error: AppError | None = None
        status = MessageStatus.COMPLETED
        try:
            async with asyncio.timeout(self._settings.request_timeout):
                # An empty reply is asked for once more: nothing reached the client yet.
                for attempt in range(2):
                    async for event in self._llm.stream(request):
                        if isinstance(event, Completion):
                            completion = event
                        elif text := event.text.replace("\x00", ""):
                            # PostgreSQL cannot store NUL in text; nobody can read it either.
                            if ttft_ms is None:
                                ttft_ms = elapsed_ms(started)
                            generation.append(text)
                    if generation.length or attempt:
                        break
                    logger.info("reply %s came back empty; retrying once", generation.message_id)
            if not generation.length:
                status = MessageStatus.FAILED
                error = UpstreamError("The model returned an empty reply", code="empty_reply")
        except UpstreamError as exc:
            error = exc
        except TimeoutError:
            error = UpstreamError(
                f"The reply took longer than {self._settings.request_timeout:g} s",
                code="reply_timeout",
                status=504,
            )
        except asyncio.CancelledError:
            # Leaving the stream closed the upstream connection; now record why it stopped.
            reason = generation.stop_reason or StopReason.SHUTDOWN
            if reason is StopReason.CANCELLED:
                status = MessageStatus.CANCELLED
            elif reason is StopReason.SHUTDOWN:
                status = MessageStatus.INCOMPLETE
                error = AppError(
                    "The service stopped during the reply", code="shutdown", status=503
                )
            generation.finishing = True
            await self._store(
                generation, request.model, status, error, completion, ttft_ms, started
            )
            raise
        except Exception:
            logger.exception("reply %s failed", generation.message_id)
            error = AppError()
        if error is not None and status is MessageStatus.COMPLETED:
            status = MessageStatus.INCOMPLETE if generation.length else MessageStatus.FAILED
        # From here on a cancel, a checkpoint or a shutdown must not interrupt the store.
        generation.finishing = True
        reply_tokens = await self._store(
            generation, request.model, status, error, completion, ttft_ms, started
        )
        if self._after_reply is not None and follow_up is not None:
            self._after_reply(follow_up, reply_tokens)

    async def _store(
        self,
        generation: Generation,
        model: str,
        status: MessageStatus,
        error: AppError | None,
        completion: Completion | None,
        ttft_ms: int | None,
        started: float,
    ) -> int:
        """Commit the reply once; its row may already be final if it was finished elsewhere.
        Returns the reply's length in tokens."""
        content = generation.content
        values: dict[str, Any] = {
            "content": content,
            "token_count": self._counter.count_text(content, model),
            "status": status,
            "latency_ms": elapsed_ms(started),
            "ttft_ms": ttft_ms,
            "completed_at": utcnow(),
            "error": (
                {"code": error.code, "detail": error.detail, "status": error.status}
                if error
                else None
            ),
        }
        if completion is not None:
            # Whatever the provider sends must fit the columns it is stored in.
            values["finish_reason"] = (completion.finish_reason or "")[:50] or None
            if completion.model:
                values["model"] = completion.model[:200]
            if completion.usage is not None:
                values["prompt_tokens"] = completion.usage.prompt_tokens
                values["completion_tokens"] = completion.usage.completion_tokens
                values["total_tokens"] = completion.usage.total_tokens
        outcome: Outcome | None = None
        try:
            stored: Message | None = None
            if generation.stop_reason is not StopReason.SUPERSEDED:
                stored, failure = await self._commit(generation, values)
                error = failure or error
            if stored is None:  # finished elsewhere, superseded, gone, or not stored
                outcome = await self._stored_outcome(generation, error)
            else:
                outcome = outcome_of(stored, headers=error.headers if error else None)
        except Exception:
            logger.exception("could not read back reply %s", generation.message_id)
            outcome = _unknown(generation)
        finally:
            # Followers are waiting on this, whatever happened above.
            generation.finish(outcome or _lost(generation, error))
        return int(values["token_count"])

    async def _commit(
        self, generation: Generation, values: dict[str, Any]
    ) -> tuple[Message | None, AppError | None]:
        """Store the reply and free its conversation, retrying a busy or restarting database;
        if that still fails, at least mark it failed and free the conversation."""
        for delay in (*self._store_retry_delays, None):
            try:
                async with self._sessionmaker() as session:
                    stored = await messages.finish(session, generation.message_id, values)
                    await conversations.release_reply(
                        session, generation.conversation_id, generation.message_id
                    )
                    await quotas.record_usage(
                        session,
                        generation.user_id,
                        values.get("total_tokens") or values["token_count"],
                    )
                    await session.commit()
                return stored, None
            except Exception:
                if delay is None:
                    logger.exception("could not store reply %s", generation.message_id)
                    break
                logger.warning(
                    "could not store reply %s; retrying in %g s", generation.message_id, delay
                )
                await asyncio.sleep(delay)
        error = AppError("The reply could not be stored", code="storage_failed", status=503)
        fallback = {
            "status": MessageStatus.INCOMPLETE if generation.length else MessageStatus.FAILED,
            "error": {"code": error.code, "detail": error.detail, "status": error.status},
            "completed_at": utcnow(),
        }
        try:
            async with self._sessionmaker() as session:
                await messages.finish(session, generation.message_id, fallback)
                await conversations.release_reply(
                    session, generation.conversation_id, generation.message_id
                )
                await session.commit()
        except Exception:
            # The sweep frees the conversation once this reply's checkpoints are stale.
            logger.exception("could not mark reply %s as failed", generation.message_id)
        return None, error

    async def _stored_outcome(self, generation: Generation, error: AppError | None) -> Outcome:
        async with self._sessionmaker() as session:
            stored = await messages.get(session, generation.message_id)
        if stored is None:
            return _lost(generation, error)
        return outcome_of(stored, headers=error.headers if error else None)


def _unknown(generation: Generation) -> Outcome:
    """The outcome of a reply whose stored state could not be read back."""
    unknown = AppError(
        "The reply's stored state could not be read; follow it again shortly",
        code="storage_unavailable",
        status=503,
    )
    return Outcome(
        message={"id": str(generation.message_id)},
        problem=unknown.to_problem() | {"assistant_message_id": str(generation.message_id)},
        headers={"Retry-After": "1"},
    )


def _lost(generation: Generation, error: AppError | None) -> Outcome:
    """The outcome of a reply whose row is gone (its conversation was deleted) or unreadable."""
    missing = AppError("The reply no longer exists", code="message_not_found", status=404)
    problem = (error or missing).to_problem()
    return Outcome(
        message={"id": str(generation.message_id)},
        problem=problem | {"assistant_message_id": str(generation.message_id)},
    )

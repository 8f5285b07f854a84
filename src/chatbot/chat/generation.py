"""Generating one reply: a task of the service that streams from the model, runs the tools it
calls, and stores every step and the end."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.config import Settings
from chatbot.context.builder import ContextTooLarge
from chatbot.context.chores import FollowUp
from chatbot.context.tokens import TokenCounter
from chatbot.conversations import repository as conversations
from chatbot.db import utcnow
from chatbot.errors import AppError, UpstreamError
from chatbot.llm.client import (
    ChatMessage,
    Completion,
    CompletionRequest,
    LLMClient,
    TokenUsage,
    ToolCall,
)
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.quotas import service as quotas
from chatbot.streams.follow import outcome_of, stored_outcome
from chatbot.streams.registry import Generation, Outcome, StopReason
from chatbot.tools.base import Tool, ToolContext, ToolResult, error_result, run_tool
from chatbot.tools.events import call_data, result_data, tool_error

logger = logging.getLogger(__name__)

STORE_RETRY_DELAYS = (0.2, 1.0, 3.0)
"""Pauses between attempts to store a finished reply before giving up on it."""


_T = TypeVar("_T")


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


class _Superseded(Exception):
    """The reply lost its conversation mid-turn: cancelled elsewhere, swept, or deleted."""


MAX_CALLS_PER_ROUND = 16
"""Calls of one round that run; more are answered with an error result (a model, or a prompt
injected through a tool's result, must not start hundreds of calls at once)."""


@dataclass
class _Round:
    """One round of calls: stored, then running, then answered."""

    calls: tuple[ToolCall, ...]
    first_seq: int
    """The position of the first call's result."""
    first_call: int
    """Where this round's calls start in the turn's list of calls."""
    model: str
    results: dict[str, ToolResult] = field(default_factory=dict)
    announced: int = 0
    """Results sent as events so far: always a prefix of the calls, so the stream has them in
    the order they are stored and replayed."""


@dataclass
class _Turn:
    """What a reply accumulates over its rounds."""

    started: float
    prompt_tokens: int
    """An estimate of the next call's prompt, for the daily quota and the context window."""
    ttft_ms: int | None = None
    rounds: int = 0
    completion: Completion | None = None
    usage: list[TokenUsage] = field(default_factory=list)
    unrecorded_tokens: int = 0
    """Tokens of the last call, not yet added to the user's day."""
    calls: list[dict[str, Any]] = field(default_factory=list)
    """The calls made so far with their results, as the finished turn lists them."""
    pending: _Round | None = None
    """The round whose calls are stored and whose results are not."""
    storing: asyncio.Future[Any] | None = None
    """A store under way, which a cancel waits for rather than cuts in half."""

    def first_output(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = elapsed_ms(self.started)

    def summed_usage(self) -> TokenUsage | None:
        if not self.usage:
            return None
        return TokenUsage(
            sum(usage.prompt_tokens for usage in self.usage),
            sum(usage.completion_tokens for usage in self.usage),
            sum(usage.total_tokens for usage in self.usage),
        )

    def unique(self, calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
        """Every call with an id of its own within the turn (some servers send none, or the
        same one each round), and no NUL, which PostgreSQL cannot store."""
        taken = {str(made["id"]) for made in self.calls}
        fixed = []
        for call in calls:
            call = replace(
                call,
                name=call.name.replace("\x00", ""),
                arguments=call.arguments.replace("\x00", ""),
            )
            if not call.id or call.id in taken or len(call.id) > 100:
                call = replace(call, id=f"call_{uuid.uuid4().hex[:24]}")
            taken.add(call.id)
            fixed.append(call)
        return tuple(fixed)


async def _shielded(turn: _Turn, work: Coroutine[Any, Any, _T]) -> _T:
    """Run a store that a cancel must not cut in half: a cancel waits for it to end
    (`_settle`), so what the reply knows always matches what the database has."""
    task = asyncio.ensure_future(work)
    turn.storing = task
    return await asyncio.shield(task)


def _announce(generation: Generation, round_: _Round, turn: _Turn) -> None:
    """Send the results that are in, in the order of the calls."""
    calls = round_.calls
    while round_.announced < len(calls) and calls[round_.announced].id in round_.results:
        call = calls[round_.announced]
        result = round_.results[call.id]
        event = result_data(call.id, call.name, result.status, result.content)
        generation.add_event("tool_result", event)
        turn.calls[round_.first_call + round_.announced].update(
            status=event["status"], result=event["result"]
        )
        round_.announced += 1


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
        tools: Mapping[str, Tool] | None = None,
        prompt_tokens: int = 0,
        budget: int | None = None,
    ) -> None:
        """Runs as a task of its own: no request, and no database session, is held meanwhile.

        While the model answers with tool calls, they run and their results go back to it, up
        to CHATBOT_MAX_TOOL_ROUNDS rounds; then the reply's text is stored."""
        turn = _Turn(started, prompt_tokens)
        error: AppError | None = None
        status = MessageStatus.COMPLETED
        try:
            async with asyncio.timeout(self._settings.request_timeout):
                while True:
                    completion = await self._complete(generation, request, turn)
                    if not completion.tool_calls:
                        break
                    request = await self._tool_round(
                        generation, request, completion, tools, turn, budget
                    )
            if not generation.content:
                status = MessageStatus.FAILED
                error = UpstreamError("The model returned an empty reply", code="empty_reply")
        except AppError as exc:  # the provider failed, or the user's quota ran out mid-turn
            error = exc
        except TimeoutError:
            error = UpstreamError(
                f"The reply took longer than {self._settings.request_timeout:g} s",
                code="reply_timeout",
                status=504,
            )
        except _Superseded:
            generation.stop_reason = StopReason.SUPERSEDED
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
            await self._settle(generation, turn)
            await self._store(generation, request.model, status, error, turn)
            raise
        except Exception:
            logger.exception("reply %s failed", generation.message_id)
            error = AppError()
        if error is not None and status is MessageStatus.COMPLETED:
            status = MessageStatus.INCOMPLETE if generation.content else MessageStatus.FAILED
        # From here on a cancel, a checkpoint or a shutdown must not interrupt the store.
        generation.finishing = True
        await self._settle(generation, turn)
        reply_tokens = await self._store(generation, request.model, status, error, turn)
        if self._after_reply is not None and follow_up is not None:
            self._after_reply(follow_up, reply_tokens)

    async def _complete(
        self, generation: Generation, request: CompletionRequest, turn: _Turn
    ) -> Completion:
        """One call to the model, streamed into the reply. A call that brings nothing at all
        is made once more: nothing of it reached the client."""
        completion: Completion | None = None
        for attempt in range(2):
            async for event in self._llm.stream(request):
                if isinstance(event, Completion):
                    completion = event
                elif text := event.text.replace("\x00", ""):
                    # PostgreSQL cannot store NUL in text; nobody can read it either.
                    turn.first_output()
                    generation.append(text)
            if generation.round_has_output or (completion and completion.tool_calls) or attempt:
                break
            logger.info("reply %s came back empty; retrying once", generation.message_id)
        completion = completion or Completion(finish_reason=None, usage=None, model=None)
        turn.completion = completion
        if completion.usage is not None:
            turn.usage.append(completion.usage)
            turn.unrecorded_tokens = completion.usage.total_tokens
        else:
            turn.unrecorded_tokens = self._counter.count_text(
                generation.content + "".join(call.arguments for call in completion.tool_calls),
                request.model,
            )
        return completion

    async def _tool_round(
        self,
        generation: Generation,
        request: CompletionRequest,
        completion: Completion,
        tools: Mapping[str, Tool] | None,
        turn: _Turn,
        budget: int | None,
    ) -> CompletionRequest:
        """Store the calls, run them, store their results, and ask the model again with them."""
        if not request.tools:
            raise UpstreamError(
                "The model asked for tools it was not offered", code="unexpected_tool_calls"
            )
        if request.tool_choice == "none":
            raise UpstreamError(
                f"The model asked for tools after the last of "
                f"{self._settings.max_tool_rounds} rounds",
                code="too_many_tool_rounds",
            )
        turn.rounds += 1
        calls = turn.unique(completion.tool_calls)
        text = generation.content
        round_ = await _shielded(
            turn, self._store_calls(generation, text, calls, turn, request.model)
        )
        await self._run_calls(generation, round_, tools or {}, turn)
        await _shielded(turn, self._store_results(generation, round_, turn))
        messages = [
            *request.messages,
            ChatMessage("assistant", text, tool_calls=[call.to_openai() for call in calls]),
            *(
                ChatMessage("tool", round_.results[call.id].content, tool_call_id=call.id)
                for call in calls
            ),
        ]
        added = messages[len(request.messages) :]
        turn.prompt_tokens += self._counter.count_text(
            json.dumps(added[0].tool_calls), request.model
        ) + sum(self._counter.count_message(message.content, request.model) for message in added)
        if budget is not None and turn.prompt_tokens > budget:
            raise ContextTooLarge(
                f"With the tool results the next call needs {turn.prompt_tokens} tokens; "
                f"the context budget of {request.model} is {budget}"
            )
        async with self._sessionmaker() as session:
            # Every round is a call to the model: it counts against the user's day.
            await quotas.check_turn(session, self._settings, generation.user_id, turn.prompt_tokens)
        last = turn.rounds >= self._settings.max_tool_rounds
        return replace(request, messages=messages, tool_choice="none" if last else None)

    async def _store_calls(
        self,
        generation: Generation,
        text: str,
        calls: tuple[ToolCall, ...],
        turn: _Turn,
        model: str,
    ) -> _Round:
        """Put the message that called tools where the reply stood, keep a position for each
        result, and move the reply after them; then announce the calls."""
        assert generation.reply_seq is not None
        seq = generation.reply_seq
        positions = len(calls) + 1
        completion = turn.completion
        served_by = completion.model if completion and completion.model else None
        now = utcnow()
        async with self._sessionmaker() as session:
            moved = await conversations.extend_reply(
                session, generation.conversation_id, generation.message_id, positions
            ) and await messages.move_reply(
                session, generation.message_id, from_seq=seq, to_seq=seq + positions
            )
            if not moved:
                raise _Superseded()
            messages.add(
                session,
                Message(
                    id=uuid.uuid4(),
                    conversation_id=generation.conversation_id,
                    seq=seq,
                    role=Role.ASSISTANT,
                    content=text,
                    token_count=self._counter.count_text(text, model),
                    status=MessageStatus.COMPLETED,
                    model=(served_by or "")[:200] or None,
                    finish_reason="tool_calls",
                    tool_calls=[call.to_openai() for call in calls],
                    created_at=now,
                    completed_at=now,
                ),
            )
            await quotas.record_usage(session, generation.user_id, turn.unrecorded_tokens)
            await session.commit()
            # Stored: from here to the end nothing awaits, so the reply's state moves with it.
            turn.unrecorded_tokens = 0
            generation.reply_seq = seq + positions
            generation.new_round()
            round_ = _Round(calls, seq + 1, len(turn.calls), model)
            turn.pending = round_
            for call in calls:
                turn.first_output()
                event = call_data(call.to_openai())
                generation.add_event("tool_call", event)
                turn.calls.append(event | {"status": None, "result": None})
            return round_

    async def _run_calls(
        self,
        generation: Generation,
        round_: _Round,
        tools: Mapping[str, Tool],
        turn: _Turn,
    ) -> None:
        """Run the calls side by side, each bounded in time and size."""
        context = ToolContext(generation.user_id, self._sessionmaker)

        async def run(index: int, call: ToolCall) -> None:
            tool = tools.get(call.name)
            if index >= MAX_CALLS_PER_ROUND:
                result = error_result(
                    f"at most {MAX_CALLS_PER_ROUND} calls run in one round; make this one again"
                )
            elif tool is None:
                result = error_result(f"there is no tool named {call.name!r}")
            else:
                result = await run_tool(
                    tool,
                    context,
                    call.arguments,
                    timeout_seconds=self._settings.tool_timeout_seconds,
                    max_result_chars=self._settings.tool_max_result_chars,
                )
            round_.results[call.id] = result
            _announce(generation, round_, turn)

        async with asyncio.TaskGroup() as group:
            for index, call in enumerate(round_.calls):
                group.create_task(run(index, call))

    async def _store_results(self, generation: Generation, round_: _Round, turn: _Turn) -> None:
        """Store one tool message per call, retrying a busy or restarting database: a call
        without its result would make the conversation unsendable."""

        async def store() -> None:
            now = utcnow()
            async with self._sessionmaker() as session:
                messages.add(
                    session,
                    *(
                        self._tool_message(generation, round_, index, call, now)
                        for index, call in enumerate(round_.calls)
                    ),
                )
                try:
                    await session.commit()
                except IntegrityError:
                    raise _Superseded() from None  # the conversation was deleted meanwhile
            turn.pending = None

        await self._retrying(generation, "tool results", store)

    def _tool_message(
        self, generation: Generation, round_: _Round, index: int, call: ToolCall, now: datetime
    ) -> Message:
        result = round_.results[call.id]
        return Message(
            id=uuid.uuid4(),
            conversation_id=generation.conversation_id,
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

    async def _settle(self, generation: Generation, turn: _Turn) -> None:
        """However the reply stopped: a store under way ends first, and a round whose calls
        are stored gets a result for each call, announced and stored, or the conversation
        could not be sent to a model again."""
        if turn.storing is not None and not turn.storing.done():
            await asyncio.wait([turn.storing])
        round_, turn.pending = turn.pending, None
        if round_ is None:
            return
        for call in round_.calls:
            round_.results.setdefault(
                call.id, error_result("the reply stopped before this call ended")
            )
        _announce(generation, round_, turn)
        try:
            await self._store_results(generation, round_, turn)
        except Exception:
            logger.exception("could not store the results of reply %s", generation.message_id)

    async def _store(
        self,
        generation: Generation,
        model: str,
        status: MessageStatus,
        error: AppError | None,
        turn: _Turn,
    ) -> int:
        """Commit the reply once; its row may already be final if it was finished elsewhere.
        Returns the reply's length in tokens."""
        content = generation.content
        values: dict[str, Any] = {
            "content": content,
            "token_count": self._counter.count_text(content, model),
            "status": status,
            "latency_ms": elapsed_ms(turn.started),
            "ttft_ms": turn.ttft_ms,
            "completed_at": utcnow(),
            "error": (
                {"code": error.code, "detail": error.detail, "status": error.status}
                if error
                else None
            ),
        }
        if (completion := turn.completion) is not None:
            # Whatever the provider sends must fit the columns it is stored in.
            values["finish_reason"] = (completion.finish_reason or "")[:50] or None
            if completion.model:
                values["model"] = completion.model[:200]
        if (usage := turn.summed_usage()) is not None:
            values["prompt_tokens"] = usage.prompt_tokens
            values["completion_tokens"] = usage.completion_tokens
            values["total_tokens"] = usage.total_tokens
        outcome: Outcome | None = None
        try:
            stored: Message | None = None
            if generation.stop_reason is not StopReason.SUPERSEDED:
                stored, failure = await self._commit(
                    generation, values, turn.unrecorded_tokens or values["token_count"]
                )
                error = failure or error
            else:
                await self._record_spent(generation, turn.unrecorded_tokens)
            if stored is None:  # finished elsewhere, superseded, gone, or not stored
                outcome = await self._stored_outcome(generation, error)
            else:
                outcome = outcome_of(
                    stored, headers=error.headers if error else None, tool_calls=turn.calls
                )
        except Exception:
            logger.exception("could not read back reply %s", generation.message_id)
            outcome = _unknown(generation)
        finally:
            # Followers are waiting on this, whatever happened above.
            generation.finish(outcome or _lost(generation, error))
        return int(values["token_count"])

    async def _commit(
        self, generation: Generation, values: dict[str, Any], tokens: int
    ) -> tuple[Message | None, AppError | None]:
        """Store the reply and free its conversation, retrying a busy or restarting database;
        if that still fails, at least mark it failed and free the conversation."""

        async def store() -> Message | None:
            async with self._sessionmaker() as session:
                stored = await messages.finish(session, generation.message_id, values)
                await conversations.release_reply(
                    session, generation.conversation_id, generation.message_id
                )
                await quotas.record_usage(session, generation.user_id, tokens)
                await session.commit()
            return stored

        try:
            return await self._retrying(generation, "the end", store), None
        except Exception:
            logger.exception("could not store reply %s", generation.message_id)
        error = AppError("The reply could not be stored", code="storage_failed", status=503)
        fallback = {
            "status": MessageStatus.INCOMPLETE if generation.content else MessageStatus.FAILED,
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

    async def _retrying(
        self, generation: Generation, what: str, store: Callable[[], Awaitable[_T]]
    ) -> _T:
        """Run a store, retrying a busy or restarting database; the last failure is raised, and
        so is a reply found superseded, which no retry mends."""
        for delay in self._store_retry_delays:
            try:
                return await store()
            except _Superseded:
                raise
            except Exception:
                logger.warning(
                    "could not store %s of reply %s; retrying in %g s",
                    what,
                    generation.message_id,
                    delay,
                )
                await asyncio.sleep(delay)
        return await store()

    async def _record_spent(self, generation: Generation, tokens: int) -> None:
        """A reply finished elsewhere still spent what its last call cost."""
        try:
            async with self._sessionmaker() as session:
                await quotas.record_usage(session, generation.user_id, tokens)
                await session.commit()
        except Exception:
            logger.exception("could not record the tokens of reply %s", generation.message_id)

    async def _stored_outcome(self, generation: Generation, error: AppError | None) -> Outcome:
        async with self._sessionmaker() as session:
            stored = await messages.get(session, generation.message_id)
            turn = await messages.turn_of(session, stored) if stored else []
        if stored is None:
            return _lost(generation, error)
        return stored_outcome(stored, turn, headers=error.headers if error else None)


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

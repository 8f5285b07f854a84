"""Generating one reply, as a task of the service: call the model, run the rounds of tools it
calls, and hand every step and the end to the store."""

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.config import Settings
from chatbot.context.builder import ContextTooLarge, context_budget, fit_messages
from chatbot.context.chores import FollowUp
from chatbot.context.tokens import TokenCounter
from chatbot.conversations import repository as conversations
from chatbot.db import utcnow
from chatbot.errors import AppError
from chatbot.llm.client import (
    ChatMessage,
    Completion,
    CompletionRequest,
    LLMClient,
    TokenUsage,
    ToolCall,
)
from chatbot.llm.errors import UpstreamContextExceeded
from chatbot.llm.windows import Window
from chatbot.messages.models import MessageStatus
from chatbot.quotas import service as quotas
from chatbot.replies.errors import (
    EmptyReply,
    ReplyFailed,
    ReplyTimeout,
    ReplyTooLong,
    ServiceStopping,
    TooManyToolRounds,
    UnexpectedToolCalls,
)
from chatbot.replies.items import StopReason
from chatbot.replies.live import LiveReply
from chatbot.replies.outcomes import without_end
from chatbot.replies.rounds import ToolRound, with_own_ids
from chatbot.replies.status import failed_or_incomplete
from chatbot.replies.store import Ending, ReplyStore, Superseded
from chatbot.sanitize import MAX_COUNT
from chatbot.tools.base import Tool

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


@dataclass(frozen=True)
class ReplyJob:
    """What a turn asks of a reply."""

    request: CompletionRequest
    started: float
    """`time.monotonic()` when the turn's request arrived: latency and TTFT count from it."""
    prompt_tokens: int
    """The prompt's size as the turn planned it."""
    budget: int | None = None
    """The context budget a prompt grown by tool results must stay within."""
    max_output_tokens: int | None = None
    """What the client asked each call to produce at most (the quota may allow less)."""
    tools: Mapping[str, Tool] = field(default_factory=dict)
    follow_up: FollowUp | None = None


@dataclass
class _Turn:
    """What a reply accumulates over its rounds."""

    started: float
    prompt_tokens: int
    """An estimate of the next call's prompt, for the daily quota and the context window."""
    budget: int | None = None
    """The context budget the prompt must stay within; smaller once a server named its window."""
    max_output_tokens: int | None = None
    ttft_ms: int | None = None
    rounds: int = 0
    completion: Completion | None = None
    usage: list[TokenUsage] = field(default_factory=list)
    unrecorded_tokens: int = 0
    """Tokens of the last call, not yet added to the user's day."""
    calling: bool = False
    """A call to the model is under way: its usage is not known yet."""
    calls: list[dict[str, Any]] = field(default_factory=list)
    """The calls made so far with their results, as the finished turn lists them."""
    call_ids: set[str] = field(default_factory=set)
    pending: ToolRound | None = None
    """The round whose calls are stored and whose results are not."""
    storing: asyncio.Future[Any] | None = None
    """A store under way, which a cancel waits for rather than cuts in half."""

    def first_output(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = elapsed_ms(self.started)

    def summed_usage(self) -> TokenUsage | None:
        """Over the reply's calls; estimated if any call's was."""
        if not self.usage:
            return None
        return TokenUsage(
            min(MAX_COUNT, sum(usage.prompt_tokens for usage in self.usage)),
            min(MAX_COUNT, sum(usage.completion_tokens for usage in self.usage)),
            min(MAX_COUNT, sum(usage.total_tokens for usage in self.usage)),
            estimated=any(usage.estimated for usage in self.usage),
        )

    def estimate_usage(self, completion_tokens: int) -> TokenUsage:
        """A call the provider reported no usage for: its planned prompt and the completion
        as the service counted it."""
        prompt = min(MAX_COUNT, self.prompt_tokens)
        completion = min(MAX_COUNT, completion_tokens)
        usage = TokenUsage(prompt, completion, min(MAX_COUNT, prompt + completion), estimated=True)
        self.usage.append(usage)
        return usage

    async def shielded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run a store that a cancel must not cut in half: a cancel waits for it to end
        (`ReplyRunner._settle`), so what the reply knows always matches what is stored."""
        task = asyncio.ensure_future(work)
        self.storing = task
        return await asyncio.shield(task)


class ReplyRunner:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        llm: LLMClient,
        counter: TokenCounter,
        store: ReplyStore,
        after_reply: Callable[[FollowUp, int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._llm = llm
        self._counter = counter
        self._store = store
        self._after_reply = after_reply

    async def run(self, reply: LiveReply, job: ReplyJob) -> None:
        """Runs as a task of its own: no request, and no database session, is held meanwhile.

        While the model answers with tool calls, they run and their results go back to it, up
        to CHATBOT_MAX_TOOL_ROUNDS rounds; then the reply's text is stored."""
        turn = _Turn(
            job.started,
            job.prompt_tokens,
            budget=job.budget,
            max_output_tokens=job.max_output_tokens,
        )
        request = job.request
        error: AppError | None = None
        status = MessageStatus.COMPLETED
        try:
            async with asyncio.timeout(self._settings.request_timeout):
                while True:
                    completion, request = await self._complete(reply, request, turn)
                    if not completion.tool_calls:
                        break
                    request = await self._tool_round(reply, request, completion, job, turn)
            if not reply.content:
                status, error = MessageStatus.FAILED, EmptyReply()
        except AppError as exc:  # the provider failed, or the user's quota ran out mid-turn
            error = exc
        except TimeoutError:
            error = ReplyTimeout(f"The reply took longer than {self._settings.request_timeout:g} s")
        except Superseded:
            reply.superseded()
        except asyncio.CancelledError:
            # Leaving the stream closed the upstream connection; now record why it stopped.
            reason = reply.stop_reason or StopReason.SHUTDOWN
            if reason is StopReason.CANCELLED:
                status = MessageStatus.CANCELLED
            elif reason is StopReason.SHUTDOWN:
                status, error = MessageStatus.INCOMPLETE, ServiceStopping()
            await self._end(reply, request, turn, status, error)
            raise
        except Exception:
            logger.exception("reply %s failed", reply.message_id)
            error = ReplyFailed()
        if error is not None and status is MessageStatus.COMPLETED:
            status = failed_or_incomplete(bool(reply.content))
        reply_tokens = await self._end(reply, request, turn, status, error)
        if self._after_reply is not None and job.follow_up is not None:
            self._after_reply(job.follow_up, reply_tokens)

    async def _complete(
        self, reply: LiveReply, request: CompletionRequest, turn: _Turn
    ) -> tuple[Completion, CompletionRequest]:
        """One call to the model, streamed into the reply; returns how it ended and the request
        as sent. A call that brings nothing at all is made once more: nothing of it reached
        the client. So is a call whose prompt the server refused as too long for the window it
        names, cut to fit that (the window is learned for later turns too)."""
        completion: Completion | None = None
        retried_empty = trimmed = False
        while True:
            position = reply.length
            try:
                completion = await self._call(reply, request, turn)
            except UpstreamContextExceeded as exc:
                if trimmed or reply.length != position:
                    raise ContextTooLarge(
                        f"The prompt does not fit the context window of {request.model}, "
                        "as its server says"
                    ) from exc
                request = self._trimmed(request, exc, turn)
                trimmed = True
                continue
            if reply.round_has_output or (completion and completion.tool_calls) or retried_empty:
                break
            retried_empty = True
            logger.info("reply %s came back empty; retrying once", reply.message_id)
        completion = completion or Completion(finish_reason=None, usage=None, model=None)
        turn.completion = completion
        turn.calling = False
        if completion.usage is not None:
            turn.usage.append(completion.usage)
            turn.unrecorded_tokens = completion.usage.total_tokens
        else:
            # None reported: the call's prompt and output as counted here, on the reply (marked
            # estimated) and in the user's day, as a reported usage would be.
            usage = turn.estimate_usage(
                self._counter.count_text(
                    reply.content + "".join(call.arguments for call in completion.tool_calls),
                    request.model,
                )
            )
            turn.unrecorded_tokens = usage.total_tokens
        return completion, request

    async def _call(
        self, reply: LiveReply, request: CompletionRequest, turn: _Turn
    ) -> Completion | None:
        completion: Completion | None = None
        limit = self._settings.max_reply_chars
        turn.calling = True
        events = self._llm.stream(request)
        try:
            async for event in events:
                if isinstance(event, Completion):
                    completion = event
                elif event.text:
                    turn.first_output()
                    if reply.length + len(event.text) > limit:
                        self._cut(reply, event.text, turn, request.model)
                    reply.append(event.text)
        finally:
            if isinstance(events, AsyncGenerator):  # closes the call to the model at once
                await events.aclose()
        return completion

    def _trimmed(
        self, request: CompletionRequest, exc: UpstreamContextExceeded, turn: _Turn
    ) -> CompletionRequest:
        """The request cut to the window the server named: older turns dropped until it fits
        (as counted here), and `max_tokens` no more than the window leaves. A server that
        names no window gets a prompt a quarter shorter."""
        max_tokens = request.max_output_tokens
        if exc.window is None:
            budget = turn.prompt_tokens * 3 // 4
        else:
            budget = context_budget(
                Window(exc.window, "learned"), turn.max_output_tokens, self._settings
            )
            if turn.budget is not None:  # never more than the turn was planned with
                budget = min(budget, turn.budget)
            too_long_a_reply = (
                max_tokens is not None and turn.prompt_tokens + max_tokens > exc.window
            )
            if turn.prompt_tokens <= budget and not too_long_a_reply:
                # It fit as counted here: the server's tokenizer counts more than ours (o200k
                # for a model tiktoken does not know). Leave it a third more room.
                budget = turn.prompt_tokens * 3 // 4
        tools = request.tools if request.tools and self._llm.takes_tools(request.model) else None
        tool_tokens = self._counter.count_text(json.dumps(tools), request.model) if tools else 0
        messages, prompt_tokens = fit_messages(
            request.messages,
            budget=budget,
            tool_tokens=tool_tokens,
            counter=self._counter,
            model=request.model,
        )
        if exc.window is not None and max_tokens is not None:
            max_tokens = min(max_tokens, max(1, exc.window - prompt_tokens))
        logger.info(
            "the prompt of %s was too long for its server (%s); retrying with %d of %d messages",
            request.model,
            f"{exc.window}-token window" if exc.window else "no window named",
            len(messages),
            len(request.messages),
        )
        turn.prompt_tokens = prompt_tokens
        turn.budget = budget
        return replace(request, messages=messages, max_output_tokens=max_tokens)

    def _cut(self, reply: LiveReply, text: str, turn: "_Turn", model: str) -> NoReturn:
        """The reply reached CHATBOT_MAX_REPLY_CHARS: keep what fits, end it there."""
        limit = self._settings.max_reply_chars
        if (room := limit - reply.length) > 0:
            reply.append(text[:room])
        turn.completion = Completion(finish_reason="length", usage=None, model=None)
        # The provider's usage never came: the prompt and this round's text, as counted here.
        completion_tokens = self._counter.count_text(reply.content, model)
        turn.unrecorded_tokens = turn.prompt_tokens + completion_tokens
        turn.estimate_usage(completion_tokens)
        turn.calling = False
        raise ReplyTooLong(
            f"The reply reached CHATBOT_MAX_REPLY_CHARS ({limit} characters) and was cut there"
        )

    async def _tool_round(
        self,
        reply: LiveReply,
        request: CompletionRequest,
        completion: Completion,
        job: ReplyJob,
        turn: _Turn,
    ) -> CompletionRequest:
        """Store the calls, run them, store their results, and ask the model again with them."""
        if not request.tools:
            raise UnexpectedToolCalls()
        if request.tool_choice == "none":
            raise TooManyToolRounds(
                f"The model asked for tools after the last of "
                f"{self._settings.max_tool_rounds} rounds"
            )
        turn.rounds += 1
        calls = with_own_ids(completion.tool_calls, turn.call_ids)
        text = reply.content
        round_ = await turn.shielded(self._store_calls(reply, calls, completion, request, turn))
        await round_.run(reply, job.tools, self._settings, self._sessionmaker)
        await turn.shielded(self._store_results(reply, round_, turn))
        added = [
            ChatMessage("assistant", text, tool_calls=[call.to_openai() for call in calls]),
            *(
                ChatMessage("tool", round_.results[call.id].content, tool_call_id=call.id)
                for call in calls
            ),
        ]
        turn.prompt_tokens += self._counter.count_text(
            json.dumps(added[0].tool_calls), request.model
        ) + sum(self._counter.count_message(message.content, request.model) for message in added)
        if turn.budget is not None and turn.prompt_tokens > turn.budget:
            raise ContextTooLarge(
                f"With the tool results the next call needs {turn.prompt_tokens} tokens; "
                f"the context budget of {request.model} is {turn.budget}"
            )
        async with self._sessionmaker() as session:
            # Every round is a call to the model: it counts against the user's day.
            ref = reply.ref
            if not await conversations.hold_reply(
                session, ref.user_id, ref.conversation_id, ref.message_id
            ):
                raise Superseded()
            max_tokens = await quotas.admit_call(
                session,
                self._settings,
                user_id=ref.user_id,
                conversation_id=ref.conversation_id,
                prompt_tokens=turn.prompt_tokens,
                max_output_tokens=job.max_output_tokens,
            )
            await session.commit()
        last = turn.rounds >= self._settings.max_tool_rounds
        return replace(
            request,
            messages=[*request.messages, *added],
            tool_choice="none" if last else None,
            max_output_tokens=max_tokens,
        )

    async def _store_calls(
        self,
        reply: LiveReply,
        calls: tuple[ToolCall, ...],
        completion: Completion,
        request: CompletionRequest,
        turn: _Turn,
    ) -> ToolRound:
        await self._store.store_calls(
            reply,
            calls,
            model=request.model,
            served_by=completion.model,
            unrecorded_tokens=turn.unrecorded_tokens,
        )
        # Stored: from here to the end nothing awaits, so the reply's state moves with it.
        turn.unrecorded_tokens = 0
        round_ = ToolRound(calls, reply.seq + 1, request.model, turn.calls)
        reply.moved(reply.seq + len(calls) + 1)
        turn.pending = round_
        turn.first_output()
        round_.announce_calls(reply)
        return round_

    async def _store_results(self, reply: LiveReply, round_: ToolRound, turn: _Turn) -> None:
        await self._store.store_results(reply, round_)
        turn.pending = None

    async def _settle(self, reply: LiveReply, turn: _Turn) -> None:
        """However the reply stopped: a store under way ends first, and a round whose calls
        are stored gets a result for each call, announced and stored, or the conversation
        could not be sent to a model again."""
        if turn.storing is not None and not turn.storing.done():
            await asyncio.wait([turn.storing])
        round_, turn.pending = turn.pending, None
        if round_ is None:
            return
        round_.answer_the_rest(reply, "the reply stopped before this call ended")
        try:
            await self._store.store_results(reply, round_)
        except Superseded:
            pass  # its conversation was deleted: there is nothing left to answer
        except Exception:
            logger.exception("could not store the results of reply %s", reply.message_id)

    async def _end(
        self,
        reply: LiveReply,
        request: CompletionRequest,
        turn: _Turn,
        status: MessageStatus,
        error: AppError | None,
    ) -> int:
        """Store the reply once and tell its followers; returns its length in tokens. From
        here on a cancel, a checkpoint or a shutdown must not interrupt it; should the process
        cut it short anyway (the last of a shutdown), followers are still told, and no store
        is left running behind it."""
        reply.begin_finishing()
        outcome = None
        try:
            await self._settle(reply, turn)
            content = reply.content
            if turn.calling and reply.round_has_output:
                # The call was cut off (a timeout, a dropped connection, a cancel) after the
                # model had produced something, which providers bill: as counted here.
                usage = turn.estimate_usage(self._counter.count_text(content, request.model))
                turn.unrecorded_tokens = usage.total_tokens
            turn.calling = False
            completion = turn.completion
            ending = Ending(
                status=status,
                content=content,
                token_count=self._counter.count_text(content, request.model),
                latency_ms=elapsed_ms(turn.started),
                ttft_ms=turn.ttft_ms,
                completed_at=utcnow(),
                error=error,
                finish_reason=completion.finish_reason if completion else None,
                model=completion.model if completion else None,
                usage=turn.summed_usage(),
            )
            outcome = await self._store.finish(
                reply,
                ending,
                tokens=turn.unrecorded_tokens or ending.token_count,
                tool_calls=turn.calls,
            )
        finally:
            if turn.storing is not None and not turn.storing.done():
                turn.storing.cancel()
            # Followers are waiting on this, whatever happened above.
            reply.finish(outcome or without_end(reply.message_id, ServiceStopping()))
        return ending.token_count

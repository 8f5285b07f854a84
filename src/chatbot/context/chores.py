"""Chores after a reply is stored: a title for a new conversation, a summary of what fell out.

They run as background tasks with sessions of their own, on the utility model
(CHATBOT_UTILITY_MODEL), and never hold up or fail a reply. A summary that fails is simply
tried again after the next reply: the messages it would have covered stay where they are, and
`summary_upto_seq` only moves once a summary that covers them is stored.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.config import Settings
from chatbot.context.builder import ContextBuilder
from chatbot.conversations.models import Conversation
from chatbot.db import changed_rows, utcnow
from chatbot.errors import UpstreamError
from chatbot.llm.client import ChatMessage, CompletionRequest, LLMClient, TextDelta
from chatbot.llm.openai_client import is_reasoning_model
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, Role
from chatbot.tools.registry import ToolRegistry

logger = logging.getLogger(__name__)

TITLE_INSTRUCTIONS = (
    "You name conversations. Given the start of one, reply with a title of at most six "
    "words that says what it is about. Reply with the title only: no quotes, no trailing "
    "punctuation, never an answer to the user."
)
TITLE_REQUEST = "Name this conversation in at most six words:\n\n{transcript}"
TITLE_WORDS = 6
TITLE_MAX_TOKENS = 32
"""Six words and some slack; a model that goes on is cut off, and its title cut to six words."""
REASONING_ALLOWANCE = 2048
"""Reasoning models count their thinking against the bound too: without room they say nothing."""
SUMMARY_INSTRUCTIONS = (
    "You keep a running summary of a conversation between a user and an assistant. Merge the "
    "earlier summary (if any) and the new messages into one summary of at most {words} words "
    "that keeps facts, names, numbers, decisions, open questions and the user's preferences. "
    "Write it in the third person. Reply with the summary only."
)
MAX_TITLE_CHARS = 80
_QUOTES = "\"'`*#\u2018\u2019\u201c\u201d"
# The most of one message a transcript keeps: its opening and its end.
SUMMARY_CHUNK_CHARS = 24_000
SUMMARY_CHUNK_TOKENS = 6_000
"""At most this much transcript per call, whatever the window: more is folded in over several."""
MIN_TRANSCRIPT_TOKENS = 256
"""A call reads at least this much, whatever the window leaves: a window too small for it fails
the summary (tried again later), never a turn."""
MIN_LINE_CHARS = 64
CHARS_PER_TOKEN = 2
"""Where one message is cut to fit a transcript: a token is rarely fewer characters than two."""
MAX_CHORE_BACKOFF_SECONDS = 3600.0
MAX_FAILING_REMEMBERED = 10_000


def _first_words(text: str, ellipsis: str = "") -> str:
    """At most TITLE_WORDS words and MAX_TITLE_CHARS characters of `text`, cut at a word."""
    words = text.split()
    title = " ".join(words[:TITLE_WORDS])
    if len(title) > MAX_TITLE_CHARS:
        title = title[:MAX_TITLE_CHARS].rsplit(" ", 1)[0] or title[:MAX_TITLE_CHARS]
    return title + ellipsis if title != " ".join(words) else title


def fallback_title(first_message: str) -> str:
    """The first message's opening words: the title when no model can name it."""
    return _first_words(first_message, "…")


def clean_title(text: str) -> str:
    """What a model sent as a title, made one: the first line, unquoted, six words at most."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    title = " ".join(lines[0].split()) if lines else ""
    title = title.strip().strip(_QUOTES).strip()
    title = title.removeprefix("Title:").strip().strip(_QUOTES).strip()
    return _first_words(title).rstrip(".,;:!?- \u2013\u2014").strip(_QUOTES).strip()


def _line(message: Message, limit: int = 0) -> str:
    """One message as the summary model reads it; a message that called tools names them. A
    message longer than one summarising call reads is cut to its opening and its end, so that
    a huge one is summarised from what fits rather than failing every time."""
    calls = ", ".join(
        f"{call.get('function', {}).get('name')}({call.get('function', {}).get('arguments')})"
        for call in message.tool_calls or []
    )
    text = f"{message.content} [called {calls}]" if calls else message.content
    return f"{message.role.value}: {_fitting(text.strip(), limit)}"


def _fitting(text: str, limit: int = 0) -> str:
    limit = limit or SUMMARY_CHUNK_CHARS
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} […{len(text) - 2 * half} characters left out…] {text[-half:]}"


def extractive_summary(previous: str | None, rows: list[Message], words: int) -> str:
    """The offline stand-in for a model: the opening of each message, newest kept."""
    lines = previous.splitlines() if previous else []
    for message in rows:
        text = " ".join(message.content.split())
        if text:
            lines.append(f"- {message.role.value}: {text[:160]}")
    while len(" ".join(lines).split()) > words and len(lines) > 1:
        lines.pop(0)
    return "\n".join(lines)


class EmptySummary(UpstreamError):
    code = "empty_reply"
    detail = "The utility model returned an empty summary"


NEXT_TURN_SLACK = 16
"""Tokens of framing the next turn adds around this turn's reply."""


@dataclass(frozen=True)
class FollowUp:
    """What a finished turn may leave to do, judged from what the turn already knew, so that
    most turns end without a single query for chores."""

    conversation_id: uuid.UUID
    untitled: bool
    summary_due: bool
    """Messages left the window that the summary does not cover yet, or the next turn will
    push some out by the cap on their number."""
    context_tokens: int
    budget: int

    def needs_summary(self, reply_tokens: int) -> bool:
        # The next context holds this one and the reply: past the budget, something must go.
        return (
            self.summary_due or self.context_tokens + reply_tokens + NEXT_TURN_SLACK > self.budget
        )


class Chores:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        context: ContextBuilder,
        utility: LLMClient | None,
        tools: ToolRegistry,
    ) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._context = context
        self._tools = tools
        self._utility = utility
        self._utility_model = settings.utility_model or settings.model
        self._running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._failing: dict[uuid.UUID, tuple[int, float]] = {}
        """Conversations whose chores failed: how many times in a row, and when to try again."""

    def after_reply(self, follow_up: FollowUp, reply_tokens: int) -> None:
        """Start what the turn left to do, unless it is nothing or already under way."""
        conversation_id = follow_up.conversation_id
        if conversation_id in self._running:
            return
        failing = self._failing.get(conversation_id)
        if failing is not None and time.monotonic() < failing[1]:
            return  # backing off: it failed a moment ago
        if not follow_up.untitled and not follow_up.needs_summary(reply_tokens):
            return
        task = asyncio.create_task(self.run(conversation_id), name=f"chores-{conversation_id}")
        self._running[conversation_id] = task
        task.add_done_callback(lambda _: self._running.pop(conversation_id, None))

    async def run(self, conversation_id: uuid.UUID) -> None:
        failed = False
        for chore in (self.name, self.summarize):
            try:
                await chore(conversation_id)
            except Exception as exc:
                if not failed:  # one failure a run, whichever chores failed in it
                    self._failed(conversation_id, chore.__name__, exc)
                failed = True
        if not failed and self._failing.pop(conversation_id, None) is not None:
            logger.info("chores for conversation %s succeed again", conversation_id)

    def _failed(self, conversation_id: uuid.UUID, chore: str, exc: Exception) -> None:
        """Log a chore's failure once for a streak of them, and back off before the next try
        (CHATBOT_CHORE_BACKOFF_SECONDS, doubling up to an hour): a failing chore must not log
        and call the utility model after every reply."""
        streak, _ = self._failing.pop(conversation_id, (0, 0.0))
        streak += 1
        first = self._settings.chore_backoff_seconds
        delay = min(first * 2.0 ** min(streak - 1, 20), max(first, MAX_CHORE_BACKOFF_SECONDS))
        self._failing[conversation_id] = (streak, time.monotonic() + delay)  # now the newest
        while len(self._failing) > MAX_FAILING_REMEMBERED:
            self._failing.pop(next(iter(self._failing)))
        if streak > 1:
            logger.debug("%s failed again for conversation %s", chore, conversation_id)
        elif isinstance(exc, UpstreamError):
            logger.warning(
                "%s failed for conversation %s (%s); tried again after %gs, quietly until it "
                "succeeds", chore, conversation_id, exc.code, delay,
            )  # fmt: skip
        else:
            logger.exception(
                "%s failed for conversation %s; tried again after %gs, quietly until it "
                "succeeds", chore, conversation_id, delay,
            )  # fmt: skip

    async def idle(self) -> None:
        """Wait for the chores under way (tests and shutdown)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def shutdown(self) -> None:
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _complete(self, instructions: str, text: str, max_tokens: int) -> str:
        """One call to the utility model, bounded: a chore's answer has a known size."""
        assert self._utility is not None
        if is_reasoning_model(self._utility_model):
            max_tokens += REASONING_ALLOWANCE
        request = CompletionRequest(
            model=self._utility_model,
            messages=[ChatMessage("system", instructions), ChatMessage("user", text)],
            max_output_tokens=max_tokens,
        )
        parts = [
            event.text
            async for event in self._utility.stream(request)
            if isinstance(event, TextDelta)
        ]
        return "".join(parts).strip()

    async def name(self, conversation_id: uuid.UUID) -> None:
        """Title a conversation after its first exchange; a title already set is never replaced."""
        async with self._sessionmaker() as session:
            conversation = await session.get(Conversation, conversation_id)
            if conversation is None or conversation.title is not None:
                return
            first = await messages.between(session, conversation_id, after_seq=0, before_seq=3)
        user = next((m for m in first if m.role is Role.USER), None)
        if user is None:
            return
        title = ""
        reply = next((m.content for m in first if m.role is Role.ASSISTANT and m.content), "")
        if self._utility is not None and reply:
            try:
                opening = f"User: {user.content[:2000]}\n\nAssistant: {reply[:2000]}"
                title = clean_title(
                    await self._complete(
                        TITLE_INSTRUCTIONS,
                        TITLE_REQUEST.format(transcript=opening),
                        TITLE_MAX_TOKENS,
                    )
                )
            except UpstreamError as exc:
                logger.warning("no title from the utility model (%s); using the message", exc.code)
        async with self._sessionmaker() as session:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.title.is_(None))
                .values(title=title or fallback_title(user.content))
            )
            await session.commit()

    async def summarize(self, conversation_id: uuid.UUID) -> None:
        """Fold the messages that no longer fit the context into the conversation's summary."""
        while True:
            async with self._sessionmaker() as session:
                conversation = await session.get(Conversation, conversation_id)
                if conversation is None:
                    return
                model = conversation.model or self._settings.model
                # Planned as the next turn will be: with the definitions of the tools it offers.
                tools = self._tools.offered(
                    conversation.toolsets,
                    conversation.user_id,
                    model_takes_tools=self._utility is None or self._utility.takes_tools(model),
                )
                plan = await self._context.plan(
                    session,
                    conversation,
                    before_seq=conversation.message_count + 1,
                    new_content=None,
                    model=model,
                    tools=[tool.to_openai() for tool in tools.values()],
                )
                window_start = plan.window_start_seq or conversation.message_count + 1
                evicted = await messages.between(
                    session,
                    conversation_id,
                    after_seq=conversation.summary_upto_seq,
                    before_seq=window_start,
                )
            evicted = [m for m in evicted if m.role is not Role.SYSTEM]
            if not evicted:
                return
            previous, covered_until = conversation.summary, conversation.summary_upto_seq
            room = await self._transcript_room(previous)
            lines = self._first_chunk(evicted, room)
            evicted = evicted[: len(lines)]
            summary = await self._summary_of(previous, evicted, lines)
            async with self._sessionmaker() as session:
                stored = await session.execute(
                    update(Conversation)
                    .where(
                        Conversation.id == conversation_id,
                        Conversation.summary_upto_seq == covered_until,
                    )
                    .values(
                        summary=summary,
                        summary_upto_seq=evicted[-1].seq,
                        summary_token_count=self._context.count(summary, model),
                        summary_updated_at=utcnow(),
                    )
                )
                await session.commit()
            if not changed_rows(stored):
                return  # somebody else moved the summary on meanwhile

    @property
    def _summary_max_tokens(self) -> int:
        # Words run one to two tokens in most languages; the slack lets a summary end.
        return self._settings.summary_words * 2 + 64

    async def _transcript_room(self, previous: str | None) -> int:
        """How many tokens of transcript one summarising call may read: what the utility
        model's window leaves beside the instructions, the earlier summary and the summary it
        writes (a 2,048-token local model reads a few hundred at a time, not 24,000
        characters)."""
        if self._utility is None:
            return SUMMARY_CHUNK_TOKENS
        window = await self._context.window(self._utility_model)
        model = self._utility_model
        instructions = SUMMARY_INSTRUCTIONS.format(words=self._settings.summary_words)
        used = (
            # CHATBOT_CONTEXT_TOKENS is a prompt's budget, the reply's room already left out.
            (0 if window.source == "setting" else self._summary_max_tokens)
            + self._context.count(instructions, model)
            + self._context.count(previous or "", model)
            + 64  # framing, the headings, and a margin
        )
        if is_reasoning_model(model):
            used += REASONING_ALLOWANCE
        return max(MIN_TRANSCRIPT_TOKENS, min(SUMMARY_CHUNK_TOKENS, window.tokens - used))

    def _first_chunk(self, rows: list[Message], room: int) -> list[str]:
        """The transcript lines of the oldest messages that fit `room` tokens of the utility
        model: at least one message, cut to fit."""
        lines: list[str] = []
        size = 0
        for message in rows:
            line, tokens = self._line_within(message, room)
            size += tokens + 1
            if lines and size > room:
                break
            lines.append(line)
        return lines

    def _line_within(self, message: Message, room: int) -> tuple[str, int]:
        """A message's line cut (opening and end) until it counts at most `room` tokens."""
        limit = _chars(room)
        while True:
            line = _line(message, limit)
            tokens = self._context.count(line, self._utility_model)
            if tokens <= room or limit <= MIN_LINE_CHARS:
                return line, tokens
            limit = max(MIN_LINE_CHARS, limit * room // tokens * 9 // 10)

    async def _summary_of(self, previous: str | None, rows: list[Message], lines: list[str]) -> str:
        words = self._settings.summary_words
        if self._utility is None:
            return extractive_summary(previous, rows, words)
        new = "\n".join(lines)
        text = f"Earlier summary:\n{previous or '(none)'}\n\nNew messages:\n{new}"
        summary = await self._complete(
            SUMMARY_INSTRUCTIONS.format(words=words), text, self._summary_max_tokens
        )
        if not summary:
            raise EmptySummary()
        return summary


def _chars(tokens: int) -> int:
    """The characters one message may keep in a transcript of `tokens` tokens."""
    return min(SUMMARY_CHUNK_CHARS, tokens * CHARS_PER_TOKEN)

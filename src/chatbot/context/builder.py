"""What one turn sends the model: system prompt, summary, whole turns newest first, the new message.

The history is read newest first from the (conversation_id, seq) index, one page at a time, and
only until the budget or the message cap is reached: building a context costs the same at message
10,000 as at message 10. Each message's token count was computed when it was stored.
"""

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from chatbot import json_codec
from chatbot.config import Settings
from chatbot.context.tokens import REPLY_PRIMING_TOKENS, TokenCounter
from chatbot.conversations.models import Conversation
from chatbot.errors import AppError
from chatbot.llm.client import ChatMessage
from chatbot.llm.windows import ContextWindows, Window
from chatbot.messages import repository as messages
from chatbot.messages.models import MessageStatus, PromptMessage, Role
from chatbot.prompts import PromptProfiles

SUMMARY_PREFIX = "Summary of the earlier part of this conversation:\n"
_PAGE = 64


class ContextTooLarge(AppError):
    status = 413
    code = "context_too_large"


def context_budget(window: Window, max_output_tokens: int | None, settings: Settings) -> int:
    """CHATBOT_CONTEXT_TOKENS, or the window less the reply's room and a margin: the reply's
    room is `max_output_tokens`, else CHATBOT_REPLY_RESERVE_TOKENS but at most half the window
    (a small local model would have no room left for the prompt)."""
    if window.source == "setting":
        return window.tokens
    reply = max_output_tokens or min(settings.reply_reserve_tokens, window.tokens // 2)
    margin = max(64, window.tokens // 50)
    return max(256, window.tokens - reply - margin)


@dataclass(frozen=True, slots=True)
class ContextPlan:
    model: str
    encoding: str
    budget: int
    system_prompt: str
    system_source: str
    system_tokens: int
    summary: str | None
    summary_upto_seq: int
    summary_tokens: int
    history: list[PromptMessage]
    history_tokens: list[int]
    new_message_tokens: int
    window: Window
    """The model's context window the budget was drawn from, and where it was learned."""
    messages: list[ChatMessage] = field(repr=False)
    tool_tokens: int = 0
    """The definitions of the tools the model is offered."""

    @property
    def total_tokens(self) -> int:
        return (
            self.tool_tokens
            + self.system_tokens
            + self.summary_tokens
            + sum(self.history_tokens)
            + self.new_message_tokens
            + REPLY_PRIMING_TOKENS
        )

    @property
    def window_start_seq(self) -> int | None:
        return self.history[0].seq if self.history else None

    @property
    def prompt_hash(self) -> str:
        prompt = {"model": self.model, "messages": [m.to_openai() for m in self.messages]}
        return hashlib.sha256(json_codec.dumps(prompt, sort_keys=True)).hexdigest()


def _sendable(message: PromptMessage) -> bool:
    if message.status is MessageStatus.IN_PROGRESS:
        return False
    return bool(message.content or message.tool_calls)


def _as_chat_message(message: PromptMessage) -> ChatMessage:
    return ChatMessage(
        message.role.value,
        message.content,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
    )


_NO_RESULT = '{"error": "no result was recorded for this call"}'


def _paired(history: list[PromptMessage]) -> list[ChatMessage]:
    """The history with every call answered right after the message that made it, as
    providers insist: a call whose result was never stored (the process died mid-call) gets
    one saying so, and a result whose call is not in the window is left out."""
    sent: list[ChatMessage] = []
    waiting: list[str] = []
    for message in history:
        if message.role is Role.TOOL:
            if message.tool_call_id in waiting:
                waiting.remove(message.tool_call_id)
                sent.append(_as_chat_message(message))
            continue
        sent += [ChatMessage("tool", _NO_RESULT, tool_call_id=call) for call in waiting]
        sent.append(_as_chat_message(message))
        waiting = [str(call.get("id")) for call in message.tool_calls or []]
    sent += [ChatMessage("tool", _NO_RESULT, tool_call_id=call) for call in waiting]
    return sent


class ContextBuilder:
    def __init__(
        self,
        settings: Settings,
        counter: TokenCounter,
        profiles: PromptProfiles,
        windows: ContextWindows | None = None,
    ) -> None:
        self._settings = settings
        self._counter = counter
        self._profiles = profiles
        # Without the model client's (which asks the server), the setting or the table.
        self._windows = windows or ContextWindows(settings)
        self._tool_token_counts: dict[tuple[str, str], int] = {}

    async def window(self, model: str) -> Window:
        return await self._windows.get(model)

    async def budget(self, model: str, max_output_tokens: int | None) -> int:
        """CHATBOT_CONTEXT_TOKENS, or the model's window less the reply's room and a margin."""
        return context_budget(await self.window(model), max_output_tokens, self._settings)

    def system_prompt(self, conversation: Conversation) -> tuple[str, str]:
        """The system prompt and where it comes from: the conversation, a profile, the default."""
        if conversation.system_prompt:
            return conversation.system_prompt, "conversation"
        profile = conversation.prompt_profile or self._profiles.default
        if profile is not None:
            return self._profiles.get(profile), f"profile:{profile}"
        return self._settings.system_prompt, "default"

    def message_tokens(self, message: PromptMessage, model: str) -> int:
        """A stored message's cost in a prompt: its kept count, framing and tool calls."""
        tokens = message.token_count
        if tokens is None:
            tokens = self._counter.count_text(message.content, model)
        if message.tool_calls:
            tokens += self._counter.count_text(json.dumps(message.tool_calls), model)
        return tokens + 4

    def count(self, text: str, model: str) -> int:
        return self._counter.count_text(text, model)

    def _tool_tokens(self, tools: list[dict[str, Any]], model: str) -> int:
        """What the tools' definitions cost: the same few toolsets on every turn, so counted
        once per model."""
        key = (model, json.dumps(tools))
        tokens = self._tool_token_counts.get(key)
        if tokens is None:
            if len(self._tool_token_counts) >= 256:
                self._tool_token_counts.clear()
            tokens = self._tool_token_counts[key] = self._counter.count_text(key[1], model)
        return tokens

    async def plan(
        self,
        session: AsyncSession,
        conversation: Conversation,
        *,
        before_seq: int,
        new_content: str | None,
        model: str,
        max_output_tokens: int | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> ContextPlan:
        """The context of a turn whose user message sits at `before_seq`."""
        window = await self.window(model)
        budget = context_budget(window, max_output_tokens, self._settings)
        # The definitions of the tools offered travel with every call.
        tool_tokens = self._tool_tokens(tools, model) if tools else 0
        system_prompt, system_source = self.system_prompt(conversation)
        system_tokens = self._counter.count_message(system_prompt, model)
        summary_text = SUMMARY_PREFIX + conversation.summary if conversation.summary else None
        summary_tokens = self._counter.count_message(summary_text, model) if summary_text else 0
        new_tokens = (
            self._counter.count_message(new_content, model) if new_content is not None else 0
        )
        fixed = tool_tokens + system_tokens + summary_tokens + new_tokens + REPLY_PRIMING_TOKENS
        if fixed > budget:
            raise ContextTooLarge(
                f"The message needs {fixed} tokens with the system prompt, summary and tools; "
                f"the context budget of {model} is {budget} ({_described(window)})"
            )
        history, history_tokens = await self._whole_turns(
            session, conversation, before_seq, model, budget - fixed
        )
        chat_messages = [ChatMessage("system", system_prompt)]
        if summary_text:
            chat_messages.append(ChatMessage("system", summary_text))
        chat_messages += _paired(history)
        if new_content is not None:
            chat_messages.append(ChatMessage("user", new_content))
        return ContextPlan(
            model=model,
            encoding=self._counter.encoder_for(model).name,
            budget=budget,
            system_prompt=system_prompt,
            system_source=system_source,
            system_tokens=system_tokens,
            summary=conversation.summary,
            summary_upto_seq=conversation.summary_upto_seq,
            summary_tokens=summary_tokens,
            history=history,
            history_tokens=history_tokens,
            new_message_tokens=new_tokens,
            messages=chat_messages,
            tool_tokens=tool_tokens,
            window=window,
        )

    async def _whole_turns(
        self,
        session: AsyncSession,
        conversation: Conversation,
        before_seq: int,
        model: str,
        room: int,
    ) -> tuple[list[PromptMessage], list[int]]:
        """Whole turns, newest first, while they fit; a turn starts at a user message.

        A turn is never cut in half, so an assistant message that called tools always travels
        with the tool results that follow it.
        """
        cap = self._settings.history_messages
        selected: list[tuple[PromptMessage, int]] = []
        turn: list[tuple[PromptMessage, int]] = []
        cursor = before_seq
        while len(selected) < cap:
            page = await messages.newest_first(
                session,
                conversation.id,
                before_seq=cursor,
                after_seq=conversation.summary_upto_seq,
                limit=_PAGE,
            )
            for message in page:
                if _sendable(message):
                    turn.insert(0, (message, self.message_tokens(message, model)))
                if message.role is not Role.USER:
                    continue
                cost = sum(tokens for _, tokens in turn)
                if cost > room or len(selected) + len(turn) > cap:
                    return _split(selected)
                selected[:0] = turn
                room -= cost
                turn = []
            if len(page) < _PAGE:
                break
            cursor = page[-1].seq
        return _split(selected)


def _described(window: Window) -> str:
    if window.source == "setting":
        return "CHATBOT_CONTEXT_TOKENS"
    return f"of a {window.tokens}-token window, {window.source}"


def fit_messages(
    messages: list[ChatMessage],
    *,
    budget: int,
    tool_tokens: int,
    counter: TokenCounter,
    model: str,
) -> tuple[list[ChatMessage], int]:
    """A prompt already built, cut to a smaller budget (a server named a smaller window than
    it was planned for), and its size as the budget counts it. The leading system messages
    and the turn under way (from the newest user message on, tool rounds and all) stay whole;
    older turns go, oldest first, whole: a turn starts at a user message, so a call and its
    results go together. ContextTooLarge when even what must stay does not fit."""

    def cost(message: ChatMessage) -> int:
        tokens = counter.count_message(message.content, model)
        if message.tool_calls:
            tokens += counter.count_text(json.dumps(message.tool_calls), model)
        return tokens

    head = 0
    while head < len(messages) and messages[head].role == "system":
        head += 1
    current = max(
        (index for index in range(head, len(messages)) if messages[index].role == "user"),
        default=head,
    )
    fixed = (
        tool_tokens
        + sum(cost(message) for message in messages[:head])
        + sum(cost(message) for message in messages[current:])
        + REPLY_PRIMING_TOKENS
    )
    if fixed > budget:
        raise ContextTooLarge(
            f"The message needs {fixed} tokens with the system prompt, summary and tools; "
            f"the context budget of {model} is {budget}"
        )
    turns: list[list[ChatMessage]] = []
    for message in messages[head:current]:
        if message.role == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    kept: list[ChatMessage] = []
    room = budget - fixed
    for turn in reversed(turns):
        turn_cost = sum(cost(message) for message in turn)
        if turn_cost > room:
            break
        kept[:0] = turn
        room -= turn_cost
    return [*messages[:head], *kept, *messages[current:]], budget - room


def _split(
    selected: list[tuple[PromptMessage, int]],
) -> tuple[list[PromptMessage], list[int]]:
    return [message for message, _ in selected], [tokens for _, tokens in selected]

"""A built-in model for trying the service with no network and no API key."""

import asyncio
import re
from collections.abc import AsyncIterator

from chatbot.llm.client import Completion, CompletionRequest, StreamEvent, TextDelta, TokenUsage

DEMO_MODEL = "demo-offline"

_TOKEN = re.compile(r"\s*\S+")


def demo_reply(request: CompletionRequest) -> str:
    last_user = next(
        (message.content for message in reversed(request.messages) if message.role == "user"), ""
    )
    quoted = " ".join(last_user.split())
    if len(quoted) > 200:
        quoted = quoted[:200] + "..."
    turns = sum(1 for message in request.messages if message.role == "user")
    return (
        f'Hello! I am the offline demo model. You said: "{quoted}". '
        f"This is turn {turns} of our conversation, and every word of it is stored. "
        "I stream one word at a time so you can watch Server-Sent Events at work. "
        "Set OPENAI_API_KEY or OPENAI_BASE_URL to talk to a real model."
    )


def _count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


class DemoChatClient:
    def __init__(self, delay_seconds: float = 0.035) -> None:
        self._delay = delay_seconds

    def model_label(self, requested: str) -> str:
        return DEMO_MODEL

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        reply = demo_reply(request)
        for token in _TOKEN.findall(reply):
            await asyncio.sleep(self._delay)
            yield TextDelta(token)
        prompt_tokens = sum(_count_tokens(message.content) + 4 for message in request.messages)
        completion_tokens = _count_tokens(reply)
        yield Completion(
            finish_reason="stop",
            usage=TokenUsage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
            model=DEMO_MODEL,
        )

    async def aclose(self) -> None:
        return None

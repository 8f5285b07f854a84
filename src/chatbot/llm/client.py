"""What the chat service needs from a model: a stream of text deltas, then how it finished."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

MAX_MODEL_CHARS = 200
MAX_FINISH_REASON_CHARS = 50
"""What the columns a reply's model and finish reason are stored in hold."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    """On an assistant message: the calls it made, in the Chat Completions shape."""
    tool_call_id: str | None = None
    """On a tool message: the call it answers."""

    def to_openai(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    messages: list[ChatMessage]
    temperature: float | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    """Tools the model may call, in the Chat Completions `tools` shape."""
    tool_choice: str | None = None
    """`none` once the reply has run as many rounds of tool calls as it may."""


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False
    """Counted by the service, not reported by the provider (servers such as llama.cpp's
    stream no usage at all)."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model asked for, assembled from however many fragments it streamed."""

    id: str
    name: str
    arguments: str
    """JSON text as the model wrote it: not checked here."""

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class Completion:
    """The last event of every successful stream."""

    finish_reason: str | None
    usage: TokenUsage | None
    model: str | None
    tool_calls: tuple[ToolCall, ...] = ()


StreamEvent = TextDelta | Completion


class LLMClient(Protocol):
    def model_label(self, requested: str) -> str:
        """The model name recorded on a reply asked of `requested`."""
        ...

    def takes_tools(self, model: str) -> bool:
        """Whether requests for `model` carry tools: false once its server refused them."""
        ...

    def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        """Yield deltas as the model produces them, then one `Completion`.

        Raises `UpstreamError` for every failure of the provider or the network.
        """
        ...

    async def aclose(self) -> None: ...

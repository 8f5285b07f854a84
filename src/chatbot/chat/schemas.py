import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from chatbot.messages.schemas import MessageOut
from chatbot.validation import (
    MaxOutputTokens,
    Metadata,
    ModelName,
    NonBlankText,
    ProfileName,
    SystemPrompt,
    Temperature,
    Title,
    ToolsetNames,
)

# A hard ceiling for the schema; the configured CHATBOT_MAX_MESSAGE_CHARS applies below it.
_CONTENT_CEILING = 1_000_000


class TurnOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName | None = None
    temperature: Temperature | None = None
    max_output_tokens: MaxOutputTokens | None = None
    background: bool = Field(
        default=False,
        strict=True,  # JSON `1` is not a boolean
        description="Answer 202 at once with a stream_url to follow the reply from",
    )


class SendMessage(TurnOptions):
    content: NonBlankText = Field(max_length=_CONTENT_CEILING)


class ChatRequest(TurnOptions):
    """`POST /v1/chat`: one call that creates the conversation when none is given."""

    message: NonBlankText = Field(max_length=_CONTENT_CEILING)
    conversation_id: str | None = Field(default=None, max_length=64)
    title: Title | None = None
    system_prompt: SystemPrompt | None = None
    prompt_profile: ProfileName | None = None
    metadata: Metadata | None = None
    toolsets: ToolsetNames | None = Field(
        default=None, description="For a new conversation: omitted, the default toolsets"
    )


class ToolCallOut(BaseModel):
    """A call the reply made; the tool messages hold the full results."""

    id: str
    name: str | None
    arguments: str | None = Field(description="JSON text, as the model wrote it")
    status: Literal["ok", "error"] | None = Field(description="null: stopped before it ended")
    result: str | None = Field(description="The start of the result")


class TurnOut(BaseModel):
    conversation_id: uuid.UUID
    user_message: MessageOut
    assistant_message: MessageOut
    tool_calls: list[ToolCallOut] = Field(
        default_factory=list, description="The tools the reply called, in order"
    )


class BackgroundTurnOut(TurnOut):
    stream_url: str = Field(
        description="Relative URL for `new EventSource(stream_url)`; carries a short-lived token"
    )

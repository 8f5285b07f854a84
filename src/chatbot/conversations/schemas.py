import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from chatbot.conversations.models import Conversation
from chatbot.validation import (
    Metadata,
    ModelName,
    ProfileName,
    SystemPrompt,
    Title,
    ToolsetNames,
)


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    prompt_profile: ProfileName | None = None
    metadata: Metadata = Field(default_factory=dict)
    toolsets: ToolsetNames | None = Field(
        default=None, description="Omitted: the service's default toolsets; [] for none"
    )


class ConversationUpdate(BaseModel):
    """Only the fields present in the body change; `null` clears a field."""

    model_config = ConfigDict(extra="forbid")

    title: Title | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    prompt_profile: ProfileName | None = None
    metadata: Metadata | None = None
    toolsets: ToolsetNames | None = None


class ConversationOut(BaseModel):
    id: uuid.UUID
    title: str | None
    model: str | None
    system_prompt: str | None
    prompt_profile: str | None
    metadata: dict[str, Any]
    toolsets: list[str]
    message_count: int
    created_at: datetime
    updated_at: datetime
    last_message_at: datetime | None

    @classmethod
    def of(cls, conversation: Conversation, toolsets: list[str]) -> "ConversationOut":
        """`toolsets`: the ones it uses, as `ToolRegistry.toolsets_of` resolves them."""
        return cls(
            id=conversation.id,
            title=conversation.title,
            model=conversation.model,
            system_prompt=conversation.system_prompt,
            prompt_profile=conversation.prompt_profile,
            metadata=conversation.metadata_ or {},
            toolsets=toolsets,
            message_count=conversation.message_count,
            created_at=conversation.created_at,
            updated_at=conversation.updated_at,
            last_message_at=conversation.last_message_at,
        )

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from chatbot.messages.models import Message, MessageStatus, Role


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False
    """True when the service counted the tokens itself: the provider reported none (llama.cpp's
    server streams no usage), for one of the reply's calls at least."""


class MessageOut(BaseModel):
    id: uuid.UUID
    conversation_id: uuid.UUID
    role: Role
    content: str
    status: MessageStatus
    model: str | None
    usage: Usage | None
    latency_ms: int | None
    ttft_ms: int | None
    finish_reason: str | None
    error: dict[str, Any] | None
    token_count: int | None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    prompt_token_count: int | None = None
    prompt_hash: str | None = None
    created_at: datetime

    @classmethod
    def of(cls, message: Message) -> "MessageOut":
        usage = None
        if message.prompt_tokens is not None and message.completion_tokens is not None:
            usage = Usage.model_construct(
                prompt_tokens=message.prompt_tokens,
                completion_tokens=message.completion_tokens,
                total_tokens=message.total_tokens
                or message.prompt_tokens + message.completion_tokens,
                estimated=bool(message.usage_estimated),
            )
        # From our own row: nothing to validate, and validating costs a turn 0.1 ms a message.
        return cls.model_construct(
            id=message.id,
            conversation_id=message.conversation_id,
            role=message.role,
            content=message.content,
            status=message.status,
            model=message.model,
            usage=usage,
            latency_ms=message.latency_ms,
            ttft_ms=message.ttft_ms,
            finish_reason=message.finish_reason,
            error=message.error,
            token_count=message.token_count,
            tool_calls=message.tool_calls,
            tool_call_id=message.tool_call_id,
            prompt_token_count=message.prompt_token_count,
            prompt_hash=message.prompt_hash,
            created_at=message.created_at,
        )

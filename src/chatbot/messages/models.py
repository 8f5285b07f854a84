import enum
import uuid
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import text

from chatbot.db import Base, JSONVariant, UTCDateTime, new_id, utcnow


class Role(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    SYSTEM = "system"


class MessageStatus(enum.StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _enum(enum_class: type[enum.StrEnum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: adding a value later is a simple migration.
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=20,
        values_callable=lambda members: [member.value for member in members],
    )


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # Pages a conversation's messages in order and reads the recent tail for context.
        UniqueConstraint("conversation_id", "seq"),
        # The sweeper looks for replies whose process stopped checkpointing them.
        Index(
            "ix_messages_in_progress_checkpoint_at",
            "checkpoint_at",
            sqlite_where=text("status = 'in_progress'"),
            postgresql_where=text("status = 'in_progress'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    content: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[MessageStatus] = mapped_column(_enum(MessageStatus, "status"))
    model: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    usage_estimated: Mapped[bool | None] = mapped_column(Boolean)
    """Whether the usage above was counted by the service (the provider reported none); null
    on rows stored before it was recorded, which were all reported."""
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(50))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    token_count: Mapped[int | None] = mapped_column(Integer)
    """Tokens of `content` as the conversation's model counts them; computed once, when stored."""
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONVariant)
    tool_call_id: Mapped[str | None] = mapped_column(String(100))
    prompt_token_count: Mapped[int | None] = mapped_column(Integer)
    """For a reply: the tokens of the exact prompt it was generated from."""
    prompt_hash: Mapped[str | None] = mapped_column(String(64))
    """For a reply: SHA-256 of that prompt (model and messages, as sent)."""
    # Last time the process generating this reply saved it; a stale one belongs to a dead process.
    checkpoint_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PromptMessage(Protocol):
    """What a prompt is planned from: a stored `Message`, or a row of just these columns (the
    history a turn reads, `repository.newest_first`)."""

    @property
    def id(self) -> uuid.UUID: ...

    @property
    def seq(self) -> int: ...

    @property
    def role(self) -> Role: ...

    @property
    def status(self) -> MessageStatus: ...

    @property
    def content(self) -> str: ...

    @property
    def token_count(self) -> int | None: ...

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None: ...

    @property
    def tool_call_id(self) -> str | None: ...

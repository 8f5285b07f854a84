import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String, Text, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from chatbot.db import Base, JSONVariant, UTCDateTime, new_id, utcnow


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        # The list endpoint pages a user's conversations by most recent activity.
        Index("ix_conversations_user_id_updated_at_id", "user_id", "updated_at", "id"),
        # A user's running replies (the cap, the quota's reservations) are counted from their
        # few conversations with a reply under way, however many they have.
        Index(
            "ix_conversations_user_id_running",
            "user_id",
            postgresql_where=text("active_reply_id IS NOT NULL"),
            sqlite_where=text("active_reply_id IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(255))
    title: Mapped[str | None] = mapped_column(String(500))
    model: Mapped[str | None] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    prompt_profile: Mapped[str | None] = mapped_column(String(100))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONVariant, default=dict)
    # Doubles as the source of each message's position: messages are numbered from it,
    # so ordering never depends on clock resolution.
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    # Set while a reply is being generated; a conditional update on it serialises turns.
    active_reply_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """What the running reply's current call may cost at most (its prompt and max_tokens),
    held against the user's daily quota until the reply is stored."""
    # The rolling summary of what fell out of the context: it covers every message whose
    # position is at most summary_upto_seq.
    toolsets: Mapped[list[str] | None] = mapped_column(JSONVariant)
    """The toolsets its replies may use; None (older rows) means the configured default."""
    summary: Mapped[str | None] = mapped_column(Text)
    summary_upto_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    summary_token_count: Mapped[int | None] = mapped_column(Integer)
    summary_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_message_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

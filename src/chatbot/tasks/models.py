import uuid
from datetime import date, datetime

from sqlalchemy import Boolean, Date, Index, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from chatbot.db import Base, UTCDateTime, new_id, utcnow


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        # Every read is one user's tasks, open ones first, oldest first.
        Index("ix_tasks_user_id_done_created_at", "user_id", "done", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(255))
    title: Mapped[str] = mapped_column(String(500))
    notes: Mapped[str | None] = mapped_column(Text)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    due_date: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

from datetime import date

from sqlalchemy import BigInteger, Date, String
from sqlalchemy.orm import Mapped, mapped_column

from chatbot.db import Base


class DailyUsage(Base):
    """Tokens a user's replies consumed on one UTC day: the daily quota reads one row."""

    __tablename__ = "daily_usage"

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)

"""an index of each user's running replies

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNNING = sa.text("active_reply_id IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_conversations_user_id_running",
        "conversations",
        ["user_id"],
        postgresql_where=_RUNNING,
        sqlite_where=_RUNNING,
    )


def downgrade() -> None:
    op.drop_index("ix_conversations_user_id_running", table_name="conversations")

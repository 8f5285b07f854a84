"""token counts, summaries, prompt profiles and tool calls

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt_profile", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("summary", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("summary_upto_seq", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("summary_token_count", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("summary_updated_at", sa.DateTime(timezone=True), nullable=True)
        )

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_count", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "tool_calls",
                sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("tool_call_id", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("prompt_token_count", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("prompt_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("prompt_hash")
        batch_op.drop_column("prompt_token_count")
        batch_op.drop_column("tool_call_id")
        batch_op.drop_column("tool_calls")
        batch_op.drop_column("token_count")

    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_column("summary_updated_at")
        batch_op.drop_column("summary_token_count")
        batch_op.drop_column("summary_upto_seq")
        batch_op.drop_column("summary")
        batch_op.drop_column("prompt_profile")

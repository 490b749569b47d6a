"""Admissions: placements waiting for, holding or done with a lifecycle slot.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admissions",
        sa.Column("order_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("place_command_id", sa.Uuid()),
        sa.Column("early_commands", postgresql.JSONB(), nullable=False, server_default="[]"),
        sa.Column("cancel_command_id", sa.Uuid()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("queued_at", sa.DateTime(timezone=True)),
        sa.Column("admitted_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )
    op.create_index(
        "ix_admissions_holding_slot",
        "admissions",
        ["status"],
        postgresql_where=sa.text("status IN ('admitting', 'running')"),
    )


def downgrade() -> None:
    op.drop_table("admissions")

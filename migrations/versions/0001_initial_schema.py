"""Initial schema: orders, payments, the audit table of events, the bridge's processed commands.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from datetime import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str, *, required: bool = False) -> sa.Column[datetime]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=not required,
        server_default=sa.func.now() if required else None,
    )


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("payment_id", sa.String(64), nullable=False),
        sa.Column("items", postgresql.JSONB(), nullable=False),
        sa.Column("address", postgresql.JSONB(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("last_event_seq", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("reason", sa.Text()),
        sa.Column("tracking_number", sa.String(64)),
        _timestamp("created_at", required=True),
        _timestamp("updated_at", required=True),
        _timestamp("validated_at"),
        _timestamp("package_prepared_at"),
        _timestamp("dispatched_at"),
        _timestamp("shipped_at"),
    )
    op.create_index("ix_orders_state", "orders", ["state"])
    # newest first is how orders are listed
    op.create_index("ix_orders_created_at", "orders", [sa.text("created_at DESC"), "id"])

    op.create_table(
        "payments",
        sa.Column("payment_id", sa.String(64), primary_key=True),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _timestamp("charged_at", required=True),
        _timestamp("refunded_at"),
    )
    op.create_index("ix_payments_order_id", "payments", ["order_id"])

    op.create_table(
        "order_events",
        sa.Column("event_id", sa.Uuid(), primary_key=True),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("correlation_id", sa.String(128)),
        sa.Column("command_id", sa.Uuid()),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        _timestamp("recorded_at", required=True),
    )
    # seq 0 marks rejections outside any lifecycle; those may repeat per order
    op.create_index(
        "uq_order_events_order_seq",
        "order_events",
        ["order_id", "seq"],
        unique=True,
        postgresql_where=sa.text("seq > 0"),
    )

    op.create_table(
        "processed_commands",
        sa.Column("command_id", sa.Uuid(), primary_key=True),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text()),
        _timestamp("processed_at", required=True),
    )


def downgrade() -> None:
    op.drop_table("processed_commands")
    op.drop_table("order_events")
    op.drop_table("payments")
    op.drop_table("orders")

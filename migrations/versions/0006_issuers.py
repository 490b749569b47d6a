"""Who placed and who approved each order: `orders.placed_by` and `orders.approved_by` (the read
model, listed per placer for customers), and `admissions.placed_by`, so the bridge applies the
placer's rules to commands for an order still waiting for admission.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("placed_by", sa.String(255)))
    op.add_column("orders", sa.Column("approved_by", sa.String(255)))
    op.create_index(
        "ix_orders_placed_by_created_at", "orders", ["placed_by", sa.text("created_at DESC"), "id"]
    )
    op.add_column("admissions", sa.Column("placed_by", sa.String(255)))


def downgrade() -> None:
    op.drop_column("admissions", "placed_by")
    op.drop_index("ix_orders_placed_by_created_at", table_name="orders")
    op.drop_column("orders", "approved_by")
    op.drop_column("orders", "placed_by")

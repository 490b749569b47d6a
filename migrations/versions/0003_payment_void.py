"""Payments can be voided: a refund that finds no charge claims the payment id, so a charge
attempt that was abandoned (the order was cancelled or ran out of time) cannot commit afterwards.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("payments", "charged_at", nullable=True)
    op.add_column("payments", sa.Column("voided_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.execute("DELETE FROM payments WHERE status = 'voided'")
    op.drop_column("payments", "voided_at")
    op.alter_column("payments", "charged_at", nullable=False)

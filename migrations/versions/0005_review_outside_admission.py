"""An order waiting for its reviewer gives its admission slot back, and takes one again once
approved, ahead of the waiting placements: admissions may be `reviewing` or `resuming`, the
latter ordered by `resuming_since`. The partial index that counts slots covers `resuming` too,
since placements count those ahead of them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("admissions", sa.Column("resuming_since", sa.DateTime(timezone=True)))
    op.drop_index("ix_admissions_holding_slot", table_name="admissions")
    op.create_index(
        "ix_admissions_counted",
        "admissions",
        ["status"],
        postgresql_where=sa.text("status IN ('admitting', 'running', 'resuming')"),
    )


def downgrade() -> None:
    # code before this knows neither state: such an order holds its slot again, as it did there
    op.execute("UPDATE admissions SET status = 'running' WHERE status IN ('reviewing', 'resuming')")
    op.drop_index("ix_admissions_counted", table_name="admissions")
    op.create_index(
        "ix_admissions_holding_slot",
        "admissions",
        ["status"],
        postgresql_where=sa.text("status IN ('admitting', 'running')"),
    )
    op.drop_column("admissions", "resuming_since")

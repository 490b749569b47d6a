"""Events get a position: their place in the audit table's commit order, so that event streams
(`GET /events/stream`, `GET /orders/{id}/events/stream`) resume exactly where a client left off.

A sequence default alone would not do: numbers are drawn at insert, transactions commit in another
order, and a reader could see 11 before 10 had committed, then resume after 11 and never see 10.
The trigger draws the number under a transaction-scoped advisory lock, so a transaction that draws
later also commits later, and every reader sees a prefix of the positions (with gaps only where a
transaction rolled back). Each insert also NOTIFYs `orderflow_events`, which PostgreSQL delivers
once per transaction, at its commit: the gateway's streams wake when a batch of events is stored.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# any fixed number other than the bridge's slot lock: serializes the transactions that store events
POSITION_LOCK_KEY = 0x0F5E_E7E5


def upgrade() -> None:
    op.execute("CREATE SEQUENCE order_events_position_seq")
    op.add_column("order_events", sa.Column("position", sa.BigInteger()))
    # the events stored so far, in the order they were recorded
    op.execute(
        """
        UPDATE order_events SET position = numbered.position
        FROM (SELECT event_id, row_number() OVER (ORDER BY recorded_at, order_id, seq) AS position
              FROM order_events) AS numbered
        WHERE order_events.event_id = numbered.event_id
        """
    )
    # setval is strict: an empty table leaves the sequence at its start
    op.execute("SELECT setval('order_events_position_seq', (SELECT max(position) FROM order_events))")
    op.alter_column("order_events", "position", nullable=False)
    op.execute("ALTER SEQUENCE order_events_position_seq OWNED BY order_events.position")
    op.create_index("uq_order_events_position", "order_events", ["position"], unique=True)
    op.create_index("ix_order_events_order_position", "order_events", ["order_id", "position"])
    op.execute(
        f"""
        CREATE FUNCTION order_events_take_position() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock({POSITION_LOCK_KEY});
            NEW.position := nextval('order_events_position_seq');
            PERFORM pg_notify('orderflow_events', '');
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER order_events_take_position BEFORE INSERT ON order_events "
        "FOR EACH ROW EXECUTE FUNCTION order_events_take_position()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER order_events_take_position ON order_events")
    op.execute("DROP FUNCTION order_events_take_position()")
    # the indexes and the sequence (owned by the column) go with it
    op.drop_column("order_events", "position")

"""The audit consumer's cost per event, side by side: this tree's `AuditLog._record` against a
baseline revision's, on the same synthetic events, each in a scratch database of its own.

    .venv/bin/python -m bench.audit_batch --baseline 3605ba4 [--orders 300] [--batch 50]

Each order runs the happy path (queued ... completed, a third of them with an address change),
with payloads like the workflow's; the lifecycles overlap as concurrent ones do, and a few events
are delivered again in a later batch. Batches of `--batch` consecutive events go through
`_record` one after another, as the consumer forms them under load. Each tree records in a process
of its own (its own `services` and `shared` first on the path), so both run their real code. The
figures: client CPU (`time.process_time`, this process only: the server's is not in it) and wall
time per 1000 events, SQL statements per batch, and the two read models compared row by row.

Not a test: it prints figures. It needs PostgreSQL (the settings' server); the baseline is checked
out into a temporary git worktree, removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

REPO = Path(__file__).resolve().parents[1]
SCRATCH_DATABASE = "orderflow_bench_audit"
START = datetime(2026, 1, 1, tzinfo=UTC)
# a lifecycle's events, as the order workflow emits them (the address change only for some orders)
HAPPY_PATH = (
    "queued",
    "admitted",
    "received",
    "validated",
    "awaiting_approval",
    "address_updated",
    "approved",
    "payment_charged",
    "shipping_started",
    "package_prepared",
    "carrier_dispatched",
    "shipped",
    "completed",
)
ADDRESS = {
    "name": "Carol",
    "line1": "1 Main Street",
    "city": "London",
    "postal_code": "N1 9GU",
    "country": "GB",
}
NEW_ADDRESS = {**ADDRESS, "line1": "221B Baker Street", "postal_code": "NW1 6XE"}
REDELIVERED_SHARE = 0.02
WARM_UP_ORDERS = 20


# The project's modules are imported inside the functions, not here: a child imports them from the
# tree it records with, which it puts first on the path before importing any.


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", help="the revision to compare with (a temporary worktree)")
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50, help="events per `_record` call")
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)  # a child: record with this tree
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tree is not None:
        tree = args.tree.resolve()
        sys.path.insert(0, str(tree))
        result = asyncio.run(record_with_tree(tree, args.database_url, args.orders, args.batch))
        print(json.dumps(result))
    elif args.baseline is None:
        parser.error("--baseline is required")
    else:
        sys.path.insert(0, str(REPO))
        compare(args.baseline, args.orders, args.batch)


# --- the parent: one child per tree --------------------------------------------------------------
def compare(baseline: str, orders: int, batch: int) -> None:
    with tempfile.TemporaryDirectory(prefix="audit_base_") as scratch:
        baseline_tree = Path(scratch) / "tree"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", str(baseline_tree), baseline], check=True)
        try:
            before = run_child(baseline_tree, orders, batch)
            after = run_child(REPO, orders, batch)
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(baseline_tree)], check=True)
    report(baseline, before, after)


def run_child(tree: Path, orders: int, batch: int) -> dict[str, Any]:
    database_url = fresh_database()
    child = [sys.executable, __file__, "--tree", str(tree), "--database-url", database_url]
    output = subprocess.run(
        [*child, "--orders", str(orders), "--batch", str(batch)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(output.splitlines()[-1])
    return result


def fresh_database() -> str:
    """The scratch database, dropped and migrated anew (with this tree's migrations)."""
    from sqlalchemy.engine import make_url

    from shared import schema
    from shared.settings import Settings

    url = make_url(Settings().database_url).set(database=SCRATCH_DATABASE)
    database_url = url.render_as_string(hide_password=False)
    asyncio.run(schema.drop_database(database_url))
    asyncio.run(schema.ensure_database(database_url))
    schema.upgrade(database_url)
    return database_url


def report(baseline: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    rows = (("baseline " + baseline, before), ("this tree", after))
    print(f"{before['events']} events ({before['orders']} orders), batches of {before['batch']}")
    print(f"{'':20} {'CPU s/1000 ev':>14} {'wall s/1000 ev':>15} {'statements/batch':>17}")
    for name, figures in rows:
        per_thousand = 1000 / figures["events"]
        statements_per_batch = figures["statements"] / figures["batches"]
        print(
            f"{name:20} {figures['cpu_seconds'] * per_thousand:14.3f} "
            f"{figures['wall_seconds'] * per_thousand:15.3f} {statements_per_batch:17.1f}"
        )
    print(
        f"{'ratio (before/after)':20} {before['cpu_seconds'] / after['cpu_seconds']:14.1f} "
        f"{before['wall_seconds'] / after['wall_seconds']:15.1f} "
        f"{before['statements'] / after['statements']:17.1f}"
    )
    same = before["read_model"] == after["read_model"] and before["recorded"] == after["recorded"]
    print("read models and outcomes:", "identical" if same else "DIFFERENT")


# --- a child: record the events with one tree's code ---------------------------------------------
async def record_with_tree(tree: Path, database_url: str, orders: int, batch: int) -> dict[str, Any]:
    """Record the events with `tree`'s `AuditLog._record` (the tree is first on the path)."""
    from sqlalchemy import event, text

    from services.audit import consumer
    from shared import db
    from shared.contracts import OrderEvent
    from shared.settings import Settings

    assert Path(consumer.__file__ or "").is_relative_to(tree), "recording with another tree's code"
    engine = db.create_engine(Settings(database_url=database_url))
    sessions = db.session_factory(engine)
    audit = consumer.AuditLog(sessions, asyncio.Event(), max_batch=batch)
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    warm_up = [OrderEvent.model_validate(one) for one in lifecycles("warm", WARM_UP_ORDERS)]
    events = [OrderEvent.model_validate(one) for one in lifecycles("ord", orders)]
    async with db.transaction(sessions) as session:
        for order_id in sorted({one.order_id for one in [*warm_up, *events]}):
            await session.execute(
                text(INSERT_ORDER),
                {"id": order_id, "payment_id": f"pay-{order_id}", "address": json.dumps(ADDRESS)},
            )
    for start in range(0, len(warm_up), batch):
        await audit._record(warm_up[start : start + batch])

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    recorded: list[bool] = []
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(events), batch):
        recorded += await audit._record(events[start : start + batch])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    event.remove(engine.sync_engine, "before_cursor_execute", count)

    async with sessions() as session:
        read_model = (await session.execute(text(READ_MODEL))).all()
    await engine.dispose()
    return {
        "orders": orders,
        "batch": batch,
        "events": len(events),
        "batches": -(-len(events) // batch),
        "statements": statements,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "recorded": recorded,
        "read_model": [[str(value) for value in row] for row in read_model],
    }


INSERT_ORDER = """
    INSERT INTO orders (id, payment_id, items, address, amount_cents, state, created_at, updated_at)
    VALUES (:id, :payment_id, '[{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250}]',
            CAST(:address AS jsonb), 2500, 'queued', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')
"""
READ_MODEL = """
    SELECT id, state, last_event_seq, reason, address, tracking_number, updated_at
    FROM orders WHERE id LIKE 'ord-%' ORDER BY id
"""


def lifecycles(prefix: str, orders: int) -> list[dict[str, Any]]:
    """The events of `orders` overlapping lifecycles in the order a consumer would get them, a
    few delivered again later; the same every run."""
    chance = random.Random(7)
    events: list[dict[str, Any]] = []
    for number in range(orders):
        order_id = f"{prefix}-{number:05d}"
        began = START + timedelta(seconds=0.05 * number)
        types = [t for t in HAPPY_PATH if t != "address_updated" or number % 3 == 0]
        for seq, event_type in enumerate(types, start=1):
            at = began + timedelta(seconds=0.4 * seq + chance.random() * 0.1)
            events.append(lifecycle_event(order_id, seq, event_type, at))
    events.sort(key=lambda one: one["occurred_at"])
    redelivered = chance.sample(events, int(len(events) * REDELIVERED_SHARE))
    for again in redelivered:
        events.insert(events.index(again) + chance.randint(60, 200), again)
    return events


def lifecycle_event(order_id: str, seq: int, event_type: str, at: datetime) -> dict[str, Any]:
    command_id: UUID | None = None
    data: dict[str, Any] = {}
    tracking_number = f"TRK-{order_id.upper()}"
    if event_type == "queued":
        data = {"queued_at": START.isoformat(), "placed_by": "carol"}
    elif event_type == "admitted":
        data = {"queued_at": START.isoformat(), "admission_wait_seconds": 0.012}
    elif event_type == "received":
        data = {"placed_by": "carol"}
    elif event_type == "awaiting_approval":
        data = {"review_window_seconds": 8.0}
    elif event_type in ("approved", "address_updated"):
        command_id = uuid5(NAMESPACE_URL, f"{order_id}/{event_type}")
        data = (
            {"approved_by": "alice", "note": "looks fine"}
            if event_type == "approved"
            else {"address": NEW_ADDRESS}
        )
    elif event_type == "payment_charged":
        data = {"amount_cents": 2500, "already_charged": False}
    elif event_type == "shipping_started":
        data = {"shipping_attempt": 1}
    elif event_type == "carrier_dispatched":
        data = {"tracking_number": tracking_number, "address": ADDRESS}
    elif event_type == "shipped":
        data = {"tracking_number": tracking_number}
    return {
        "event_id": uuid5(NAMESPACE_URL, f"{order_id}/{seq}"),
        "type": event_type,
        "order_id": order_id,
        "seq": seq,
        "occurred_at": at,
        "correlation_id": f"corr-{order_id}",
        "command_id": command_id,
        "data": data,
    }


if __name__ == "__main__":
    main()

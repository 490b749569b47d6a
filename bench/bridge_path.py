"""The bridge's own cost per order, side by side for source trees: CPU seconds per 100 orders, and
database statements, transactions and round trips per order.

Each order is a placement and then its approval, handed straight to the bridge's handlers (no
broker consumer in between) with a free slot, the bridge publishing its events to RabbitMQ and
starting and signalling workflows on a Temporal dev server of the bench's own (no worker: a start
and a signal are accepted without one). Each tree runs in a process of its own, on a scratch
database and vhost, so two versions of the same modules never meet; rounds alternate the trees.

    git worktree add /tmp/bridge_base <commit>   # the tree to compare with
    .venv/bin/python bench/bridge_path.py --tree /tmp/bridge_base --tree . --orders 300 --rounds 3

Round trips count every statement, BEGIN, COMMIT and ROLLBACK, and the pool's pre-ping (BEGIN, `;`,
ROLLBACK on each checkout); transactions leave out the pre-pings. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

REPO = Path(__file__).resolve().parents[1]
SCRATCH = "orderflow_bench_bridge"
WARM_UP_ORDERS = 30
IN_FLIGHT = 8  # orders handled at once, as a bridge with several messages in hand would


class Message:
    """What the handlers use of a delivered message: the publisher, the ack."""

    user_id = "bench"

    async def ack(self) -> None:
        return None


class Tally:
    """What the engine sends to PostgreSQL: statements (SQLAlchemy's cursor executions) and the
    simple queries asyncpg logs (BEGIN, COMMIT, ROLLBACK, the pre-ping's `;`)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.on = False

    def attach(self, engine: Any) -> None:
        from sqlalchemy import event

        @event.listens_for(engine.sync_engine, "connect")
        def log_simple_queries(_: Any, record: Any) -> None:
            record.driver_connection.add_query_logger(self._simple_query)

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def count_statement(connection: Any, *_: Any) -> None:
            if self.on:
                self.counts["statements"] += 1
                if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                    self.counts["autocommit"] += 1

    def _simple_query(self, record: Any) -> None:
        if self.on:
            # `BEGIN ISOLATION LEVEL ...` once a connection's isolation level was set and reset
            words = record.query.rstrip(";").split()
            self.counts[words[0] if words else "ping"] += 1

    def per_order(self, orders: int) -> dict[str, float]:
        c = self.counts
        round_trips = c["statements"] + c["BEGIN"] + c["COMMIT"] + c["ROLLBACK"] + c["ping"]
        # a pre-ping is a BEGIN of its own; a statement without BEGIN is a transaction of its own
        transactions = c["BEGIN"] - c["ping"] + c["autocommit"]
        figures = {
            "statements": c["statements"],
            "transactions": transactions,
            "pre-pings": c["ping"],
            "round trips": round_trips,
        }
        return {name: value / orders for name, value in figures.items()}


async def child(tree: Path, temporal_address: str, orders: int) -> dict[str, float]:
    """Run warm-up and measured orders through this tree's bridge: its figures."""
    sys.path.insert(0, str(tree))
    consumer: Any = importlib.import_module("services.bridge.consumer")
    # the admission gate had the module name `admission` before; trees of that time have it so
    gate = "admission_gate" if (tree / "services/bridge/admission_gate.py").exists() else "admission"
    admission: Any = importlib.import_module(f"services.bridge.{gate}")
    lifecycles: Any = importlib.import_module("services.bridge.lifecycles")
    # the launcher moved out of services/; trees before that have it there
    launcher = "devstack.stack" if (tree / "devstack").is_dir() else "services.stack"
    stack: Any = importlib.import_module(launcher)
    shared_broker: Any = importlib.import_module("shared.broker")
    db: Any = importlib.import_module("shared.db")
    schema: Any = importlib.import_module("shared.schema")
    settings_module: Any = importlib.import_module("shared.settings")
    temporal: Any = importlib.import_module("shared.temporal")
    logging_module: Any = importlib.import_module("shared.logging")

    settings = stack.isolated_settings(settings_module.Settings(log_json=True), SCRATCH).model_copy(
        update={
            "temporal_address": temporal_address,
            "order_task_queue": f"bench-bridge-{uuid4().hex[:8]}",
            "max_running_lifecycles": 1_000_000,
        }
    )
    logging_module.configure_logging(settings, "bridge")
    await schema.drop_database(settings.database_url)
    await schema.ensure_database(settings.database_url)
    await asyncio.to_thread(schema.upgrade, settings.database_url)

    client = await temporal.connect_temporal(settings)
    engine = db.create_engine(settings)
    tally = Tally()
    tally.attach(engine)
    connection = await shared_broker.connect(settings, "bench")
    stop = asyncio.Event()
    try:
        _, topology = await shared_broker.open_channel(connection)
        ledger_takes = inspect.signature(admission.AdmissionLedger).parameters
        parts = (lifecycles.OrderLifecycles(client, settings), admission.SlotGate(settings))
        if "sessions" in ledger_takes:  # the ledger of a session factory, beside ProcessedCommands
            sessions = db.session_factory(engine)
            ledger = admission.AdmissionLedger(sessions, settings.max_running_lifecycles)
            processed = consumer.ProcessedCommands(sessions)
            bridge = consumer.Bridge(parts[0], ledger, parts[1], processed, topology, stop)
        elif "identities" in inspect.signature(consumer.Bridge).parameters:
            ledger = admission.AdmissionLedger(engine, settings.max_running_lifecycles)
            # the bench's publisher names its customer and its reviewer, as the gateway does
            identities = importlib.import_module("services.bridge.issuers").PublisherIdentities(
                {Message.user_id: []}, [Message.user_id]
            )
            bridge = consumer.Bridge(parts[0], ledger, parts[1], identities, topology, stop)
        else:
            ledger = admission.AdmissionLedger(engine, settings.max_running_lifecycles)
            bridge = consumer.Bridge(parts[0], ledger, parts[1], topology, stop)

        async def run(count: int) -> None:
            turns = asyncio.Semaphore(IN_FLIGHT)

            async def one_order() -> None:
                async with turns:
                    placement, approval = commands(tree)
                    # trees from before one handler took both have one of their own for placements
                    await getattr(bridge, "handle_placement", bridge.handle)(Message(), placement)
                    await bridge.handle(Message(), approval)

            await asyncio.gather(*(one_order() for _ in range(count)))

        await run(WARM_UP_ORDERS)
        tally.on = True
        cpu, wall = time.process_time(), time.perf_counter()
        await run(orders)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        tally.on = False
    finally:
        stop.set()
        await connection.close()
        await engine.dispose()
    return {"cpu_per_100": cpu / orders * 100, "wall_seconds": wall, **tally.per_order(orders)}


def commands(tree: Path) -> tuple[Any, Any]:
    contracts: Any = importlib.import_module("shared.contracts")
    order_id = f"bench-{uuid4().hex[:12]}"
    now = datetime.now(UTC)
    # issuers are ignored by trees from before they were checked
    issuers = hasattr(contracts, "Actor")
    placement = contracts.PlaceOrder.model_validate(
        {
            "command_id": str(uuid4()),
            "order_id": order_id,
            "issued_at": now.isoformat(),
            **({"issued_by": {"subject": "bench-customer", "roles": ["customer"]}} if issuers else {}),
            "payload": {
                "payment_id": f"pay-{order_id}",
                "items": [{"sku": "BOOK-1", "qty": 2, "unit_price_cents": 1250}],
                "address": {
                    "name": "Ada",
                    "line1": "12 Main St",
                    "city": "Berlin",
                    "postal_code": "10115",
                    "country": "DE",
                },
            },
        }
    )
    reviewer = {"issued_by": {"subject": "bench-reviewer", "roles": ["reviewer"]}} if issuers else {}
    approval = contracts.ApproveOrder.model_validate(
        {"command_id": str(uuid4()), "order_id": order_id, "issued_at": now.isoformat(), **reviewer}
    )
    return placement, approval


async def parent(trees: list[Path], orders: int, rounds: int) -> None:
    from temporalio.testing import WorkflowEnvironment

    server = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(Path(sys.executable).parent / "temporal"),
        dev_server_log_level="error",
        dev_server_extra_args=["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=off"],
    )
    address = server.client.service_client.config.target_host
    runs: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
    try:
        for round_number in range(rounds):
            for tree in trees:
                runs[tree].append(await asyncio.to_thread(run_child, tree, address, orders))
                figures = runs[tree][-1]
                print(
                    f"round {round_number + 1} {tree}: {figures['cpu_per_100']:.3f} CPU s per 100 orders",
                    file=sys.stderr,
                )
    finally:
        await server.shutdown()
    report(runs, orders, rounds)


def run_child(tree: Path, address: str, orders: int) -> dict[str, float]:
    from devstack.stack import RUN_DIR, local_payload_keys  # this tree's, in the parent only

    # this tree's local payload key, unless one is configured (trees before it ignore it)
    keys = {"ORDERFLOW_PAYLOAD_KEYS_FILE": str(local_payload_keys(RUN_DIR))}
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        arguments = ["--child", "--tree", str(tree), "--temporal", address, "--orders", str(orders)]
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *arguments, "--result", str(result)],
            cwd=tree,
            env={**keys, **os.environ, "PYTHONPATH": str(tree)},
            stdout=subprocess.DEVNULL,
            check=True,
        )
        figures: dict[str, float] = json.loads(result.read_text())
        return figures


def report(runs: dict[Path, list[dict[str, float]]], orders: int, rounds: int) -> None:
    print(f"{orders} orders (placement + approval) per run, {rounds} runs per tree; median of the runs")
    names = ["cpu_per_100", "statements", "transactions", "pre-pings", "round trips", "wall_seconds"]
    labels = {"cpu_per_100": "CPU s / 100 orders", "wall_seconds": "wall s / run"}
    print(f"{'':24}" + "".join(f"{tree!s:>26}" for tree in runs))
    for name in names:
        cells = "".join(
            f"{statistics.median(r[name] for r in tree_runs):>26.3f}" for tree_runs in runs.values()
        )
        print(f"{labels.get(name, name + ' / order'):24}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, action="append", help="a source tree (repeat to compare)")
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--temporal", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [REPO]]
    if args.child:
        args.result.write_text(json.dumps(asyncio.run(child(trees[0], args.temporal, args.orders))))
    else:
        asyncio.run(parent(trees, args.orders, args.rounds))


if __name__ == "__main__":
    main()

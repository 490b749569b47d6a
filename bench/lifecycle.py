"""Orders through the whole pipeline, with the real fault injector, timed from command to end.

Starts its own system (Temporal dev server, api, bridge, workers, audit: the `make run` launcher)
on a database and RabbitMQ vhost of its own, publishes PlaceOrder commands at a steady rate,
approves each order through the command queue when its `awaiting_approval` event arrives, and
times each order from its PlaceOrder to its terminal event on `orders.events`.

    python bench/lifecycle.py --orders 200 --rate 4
    python bench/lifecycle.py --orders 200 --rate 4 --variants 1:0.5,2:0.5   # side by side

A variant is PARALLEL_ATTEMPTS:ATTEMPT_TIMEOUT_SECONDS; the default is the shipped configuration.

Prints, per configuration: completed / cancelled / failed / lost (accepted, no terminal event),
the end-to-end time distribution, how many took longer than 15 s, and the CPU the services and the
Temporal server used per order.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

from aio_pika.abc import AbstractIncomingMessage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.stack import (  # noqa: E402
    Stack,
    TemporalDevServer,
    free_port,
    isolated_settings,
    running_stack,
)
from shared import broker  # noqa: E402
from shared.contracts import (  # noqa: E402
    Address,
    ApproveOrder,
    EventType,
    OrderEvent,
    OrderItem,
    PlaceOrder,
    PlaceOrderPayload,
)
from shared.schema import drop_database  # noqa: E402
from shared.settings import Settings  # noqa: E402

BENCH_NAME = "orderflow_bench"
CONTRACT_SECONDS = 15.0
ADDRESS = Address(name="Bench", line1="1 Load Street", city="Testville", postal_code="12345", country="DE")


@dataclass
class OrderClock:
    placed_at: float
    ended_at: float | None = None
    ending: EventType | None = None


@dataclass
class Run:
    variant: Variant
    orders: dict[str, OrderClock] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def ended(self, kind: EventType) -> int:
        return sum(1 for clock in self.orders.values() if clock.ending is kind)

    @property
    def lost(self) -> int:
        return sum(1 for clock in self.orders.values() if clock.ending is None)

    @property
    def durations(self) -> list[float]:
        return sorted(c.ended_at - c.placed_at for c in self.orders.values() if c.ended_at is not None)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass(frozen=True)
class Variant:
    parallel_attempts: int
    attempt_timeout: float

    @classmethod
    def parse(cls, text: str) -> Variant:
        parallel, timeout = text.split(":")
        return cls(int(parallel), float(timeout))

    def __str__(self) -> str:
        return f"{self.parallel_attempts}x {self.attempt_timeout:g}s"


def bench_settings(variant: Variant, temporal_port: int) -> Settings:
    api_port = free_port()
    return isolated_settings(Settings(), BENCH_NAME).model_copy(
        update={
            "temporal_address": f"127.0.0.1:{temporal_port}",
            "api_port": api_port,
            "api_url": f"http://127.0.0.1:{api_port}",
            "parallel_attempts": variant.parallel_attempts,
            "activity_attempt_timeout_seconds": variant.attempt_timeout,
        }
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / 100.0


def stack_cpu(stack: Stack) -> dict[str, float]:
    return {name: process_cpu_seconds(pid) for name, pid in stack.pids().items()}


def place_command(order_id: str) -> PlaceOrder:
    return PlaceOrder(
        command_id=uuid4(),
        order_id=order_id,
        issued_at=datetime.now(UTC),
        payload=PlaceOrderPayload(
            payment_id=f"pay-{order_id}",
            items=[OrderItem(sku="SKU-1", qty=1, unit_price_cents=999)],
            address=ADDRESS,
        ),
    )


async def drive(settings: Settings, run: Run, count: int, rate: float, patience: float) -> None:
    """Place `count` orders at `rate` per second, approve each when asked, wait for the ends."""
    connection = await broker.connect(settings, "bench")
    channel, topology = await broker.open_channel(connection)
    approvals: set[asyncio.Task[None]] = set()
    all_ended = asyncio.Event()

    async def on_event(message: AbstractIncomingMessage) -> None:
        await message.ack()
        event = OrderEvent.model_validate_json(message.body)
        clock = run.orders.get(event.order_id)
        if clock is None:
            return
        if event.type is EventType.AWAITING_APPROVAL:
            approve = ApproveOrder(command_id=uuid4(), order_id=event.order_id, issued_at=datetime.now(UTC))
            task = asyncio.create_task(broker.publish_command(topology, approve))
            approvals.add(task)
            task.add_done_callback(approvals.discard)
        elif event.type.is_terminal and clock.ending is None:
            clock.ended_at, clock.ending = time.monotonic(), event.type
            if len(run.orders) == count and all(c.ending for c in run.orders.values()):
                all_ended.set()

    events = await channel.declare_queue(exclusive=True, auto_delete=True)
    await events.bind(topology.events, routing_key="order.#")
    await events.consume(on_event)
    try:
        started = time.monotonic()
        for index in range(count):
            await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
            order_id = f"bench-{uuid4().hex[:12]}"
            run.orders[order_id] = OrderClock(placed_at=time.monotonic())
            await broker.publish_command(topology, place_command(order_id))
        try:
            await asyncio.wait_for(all_ended.wait(), patience)
        except TimeoutError:
            pass  # whatever has not ended by now counts as lost
        run.wall_seconds = time.monotonic() - started
    finally:
        await connection.close()


async def bench_once(variant: Variant, count: int, rate: float, patience: float) -> Run:
    temporal = TemporalDevServer(port=free_port(), ui_port=free_port(), ui=False)
    settings = bench_settings(variant, temporal.port)
    await drop_database(settings.database_url)
    run = Run(variant=variant)
    with tempfile.NamedTemporaryFile("w", prefix="orderflow-bench-", suffix=".log", delete=False) as log:
        async with running_stack(settings, temporal=temporal, log=log) as stack:
            await asyncio.sleep(2)  # let the workers start polling
            before = stack_cpu(stack)
            await drive(settings, run, count, rate, patience)
            after = stack_cpu(stack)
        print(f"  (service logs: {log.name})", file=sys.stderr)
    run.cpu_seconds = {name: after[name] - before[name] for name in after}
    return run


def report(runs: list[Run], rate: float) -> None:
    columns = [str(r.variant) for r in runs]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    row("orders", [str(len(r.orders)) for r in runs])
    row("offered rate (orders/s)", [f"{rate:g}" for _ in runs])
    for kind in (EventType.COMPLETED, EventType.CANCELLED, EventType.FAILED):
        row(kind.value, [str(r.ended(kind)) for r in runs])
    row("lost (no terminal event)", [str(r.lost) for r in runs])
    for label, fraction in (("min", 0.0), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        row(f"{label} end-to-end (s)", [f"{percentile(r.durations, fraction):.2f}" for r in runs])
    row("mean end-to-end (s)", [f"{statistics.fmean(r.durations):.2f}" for r in runs])
    row(f"over {CONTRACT_SECONDS:g} s", [str(sum(d > CONTRACT_SECONDS for d in r.durations)) for r in runs])
    row("terminal within 15 s (%)", [f"{100 * sum(d <= CONTRACT_SECONDS for d in r.durations) / len(r.orders):.1f}" for r in runs])
    for process in ("temporal", "workers", "bridge", "audit", "api"):
        row(f"CPU ms/order {process}", [f"{1000 * r.cpu_seconds.get(process, 0) / len(r.orders):.0f}" for r in runs])
    width = max(len(label) for label, _ in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{c:>12}" for c in columns))
    for label, values in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{v:>12}" for v in values))
    if len(runs) > 1:
        base = runs[0]
        for other in runs[1:]:
            for label, fraction in (("p50", 0.5), ("p99", 0.99)):
                ratio = percentile(other.durations, fraction) / percentile(base.durations, fraction)
                print(f"{label} ratio {other.variant} / {base.variant}: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="orders placed per second")
    shipped = Settings()
    parser.add_argument(
        "--variants",
        default=f"{shipped.parallel_attempts}:{shipped.activity_attempt_timeout_seconds:g}",
        help="comma-separated PARALLEL_ATTEMPTS:ATTEMPT_TIMEOUT_SECONDS; one run each, side by side",
    )
    parser.add_argument("--patience", type=float, default=60.0, help="seconds to wait after the last order")
    args = parser.parse_args()
    runs = []
    for variant in (Variant.parse(v) for v in args.variants.split(",")):
        print(f"running {args.orders} orders at {args.rate:g}/s, attempts {variant} ...", file=sys.stderr)
        runs.append(asyncio.run(bench_once(variant, args.orders, args.rate, args.patience)))
    report(runs, args.rate)
    if any(r.lost for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()

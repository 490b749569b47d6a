"""Chaos: orders under load while every process is killed -9 and every server restarted.

    python bench/chaos.py                          # 300 orders at 4/s (make chaos)
    python bench/chaos.py --orders 600 --rate 4 --rounds 2

The whole system (the `make run` launcher) runs on servers of its own: a PostgreSQL and a RabbitMQ
started for the run (testsupport/servers.py; never the machine's shared ones) and a Temporal dev
server that keeps its state in a file. Orders are placed over the REST gateway at a steady rate and
approved when they ask, as in bench/lifecycle.py; every --cancel-every-th order is cancelled over
AMQP as soon as its placement is accepted, racing its registration. Meanwhile, one at a time and
spread evenly over the load, api, bridge, workers and audit are killed -9 and started again,
RabbitMQ and PostgreSQL are restarted, and the Temporal server is killed -9 and started again
(--rounds times over).

The clients ride out the outages as real ones should: a placement or approval the system did not
confirm (connection refused, 503) is sent again with the same command id, so it has one effect,
until it is. The lifecycle timing is generous (30 s review window, 45 s deadline, as in the
end-to-end tests), so that an outage of a few seconds is not a timeout and anything but `completed`
stands out.

Once every accepted order has ended (or none has for --patience s), what the clients saw on
`orders.events` is checked against the audit table, the read model, the payments and Temporal's
list of workflows. Prints, over the accepted orders:

- completed / cancelled / failed;
- lost: no terminal event, on the bus or in the audit table, or an event seen on the bus missing
  from the audit table;
- duplicated effects: more than one lifecycle (workflow run) for the order, one of its steps
  stored twice (two `received`, two `completed`, ... under different event ids), or a command
  that took effect and was also rejected;
- double charges: more than one payment row or more than one `payment_charged`;
- payments not matching the outcome: completed without a standing charge, or ended otherwise with
  the money still taken;
- seq gaps: events not numbered 1, 2, 3, ... on the bus or in the audit table;
- read-model mismatches: the `orders` row's state, last seq or tracking number not those of the
  order's events;
- services that exited by themselves (nothing restarts them, so they stay down).

Exits non-zero if any of these but completed / cancelled / failed is above 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a file

from bench.load import BENCH_PUBLISHER, Load, customer_token, offer, place_command
from bench.measure import Ledger, OrderClock, Outcome
from bench.pipeline import approve_command
from bench.report import MAX_FAULTS_SHOWN
from devstack.servers import PrivatePostgres, PrivateRabbitMQ
from devstack.stack import RUN_DIR, Stack, TemporalDevServer, free_port, running_stack, with_payload_keys
from services.audit.projection import STATE_OF_EVENT
from services.workers.business_functions import PaymentStatus
from shared import broker, db, local_issuer
from shared.contracts import Command, EventType, OrderEvent
from shared.db import AuditEvent, Order, Payment
from shared.lifecycle import ORDER_WORKFLOW, order_workflow_id
from shared.settings import Settings
from shared.temporal import connect_temporal
from testsupport.orders import ONCE_PER_COMPLETED_ORDER, cancel_order, order_body_of
from testsupport.servers import (
    ServerPrograms,
    on_private_servers,
    private_servers,
    publish_until_confirmed,
)

CHAOS_DATABASE = "orderflow_chaos"
EVENTS_QUEUE = "chaos.events"
DISRUPTIONS = ("workers", "rabbitmq", "bridge", "postgres", "audit", "temporal", "api")
RETRY_SECONDS = 0.5
APPROVAL_PATIENCE_SECONDS = 120.0
AUDIT_POLL_SECONDS = 0.5
# the steps an order takes at most once
ONCE_PER_ORDER = frozenset({*ONCE_PER_COMPLETED_ORDER, "cancelled", "failed"})


@dataclass
class ChaosSystem:
    """The running stack and the private servers under it."""

    settings: Settings
    stack: Stack
    postgres: PrivatePostgres
    rabbitmq: PrivateRabbitMQ

    async def disrupt(self, target: str) -> None:
        """Restart a server, or kill a process -9 and start it again (the Temporal server too)."""
        match target:
            case "rabbitmq":
                await self.rabbitmq.restart()
            case "postgres":
                await self.postgres.restart()
            case _:
                await self.stack.crash_and_restart(target)


class PatientClients:
    """Place orders over the gateway and approve each when it asks, as bench/pipeline.py does, but
    riding out outages: what the system did not confirm is sent again, with the same command id,
    until it is."""

    def __init__(
        self, api: httpx.AsyncClient, topology: broker.Topology, ledger: Ledger, cancel_every: int
    ) -> None:
        self._api = api
        self._topology = topology
        self._ledger = ledger
        self._cancel_every = cancel_every
        self._placements = 0
        self._commands: set[asyncio.Task[None]] = set()

    async def place(self, order_id: str) -> None:
        body = order_body_of(place_command(order_id))
        while True:
            if await self._placed(body):
                break
            await asyncio.sleep(RETRY_SECONDS)
        self._placements += 1
        if self._cancel_every and self._placements % self._cancel_every == 0:
            self._send(cancel_order(order_id))

    def _send(self, command: Command) -> None:
        sending = publish_until_confirmed(self._topology, command, patience=APPROVAL_PATIENCE_SECONDS)
        self._commands.add(asyncio.create_task(sending))

    async def _placed(self, body: dict[str, Any]) -> bool:
        try:
            answer = await self._api.post("/orders", json=body)
        except httpx.TransportError:  # the gateway is down (killed, starting again)
            return False
        if answer.status_code == 503:  # the broker is away (or the backlog full): later
            return False
        answer.raise_for_status()
        return True

    def cpu_seconds(self) -> dict[str, float]:
        """Not measured: a killed process takes its CPU count with it."""
        return {}

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        event = OrderEvent.model_validate_json(message.body)
        clock = self._ledger.observe(event.order_id, event.type, seq=event.seq, event_id=event.event_id)
        if clock is not None and event.type is EventType.AWAITING_APPROVAL and not clock.approval_requested:
            clock.approval_requested = True
            self._send(approve_command(event.order_id))

    async def commands_sent(self) -> None:
        """Every approval and cancel confirmed by the broker (raises if one never was)."""
        await asyncio.gather(*self._commands)


@asynccontextmanager
async def running_chaos_system(log_file: Path) -> AsyncIterator[ChaosSystem]:
    """The stack on private servers, and a Temporal dev server keeping its state in a file."""
    with tempfile.TemporaryDirectory(prefix="orderflow-chaos-temporal-") as temporal_dir:
        temporal = TemporalDevServer(
            port=free_port(), ui_port=free_port(), db_file=Path(temporal_dir) / "temporal.db", ui=False
        )
        issuer_key = Path(temporal_dir) / "local-issuer.pem"
        local_issuer.ensure_key(issuer_key)
        async with private_servers(ServerPrograms.found()) as (postgres, rabbitmq):
            identity = with_payload_keys(Settings(), RUN_DIR).model_copy(
                update={
                    **BENCH_PUBLISHER,
                    "auth_local_issuer": True,
                    "auth_local_issuer_key_file": issuer_key,
                }
            )
            settings = on_private_servers(identity, postgres, rabbitmq, temporal, CHAOS_DATABASE)
            with log_file.open("w") as log:
                async with running_stack(settings, temporal=temporal, log=log) as stack:
                    yield ChaosSystem(settings, stack, postgres, rabbitmq)


async def disrupt_in_turn(system: ChaosSystem, schedule: list[str], interval: float) -> None:
    """The k-th disruption `k * interval` seconds from now, or when the one before it is over."""
    started = time.monotonic()
    for number, target in enumerate(schedule, start=1):
        await asyncio.sleep(max(0.0, started + number * interval - time.monotonic()))
        began = time.monotonic()
        await system.disrupt(target)
        what = "restarted" if target in ("rabbitmq", "postgres") else "killed -9 and restarted"
        print(
            f"  {began - started:6.1f} s  {target} {what} ({time.monotonic() - began:.1f} s)", file=sys.stderr
        )


@dataclass
class Findings:
    """Orders (or services) by what is wrong with them."""

    problems: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, problem: str, order_id: str) -> None:
        self.problems[problem].add(order_id)

    def count(self, problem: str) -> int:
        return len(self.problems[problem])


PROBLEMS = (
    "lost",
    "duplicated effects",
    "double charges",
    "payments not matching the outcome",
    "seq gaps",
    "read-model mismatches",
    "services that exited by themselves",
)


async def stored_trails(
    sessions: async_sessionmaker[AsyncSession], ledger: Ledger, order_ids: list[str], patience: float
) -> dict[str, list[AuditEvent]]:
    """Each order's audit rows, in seq order, once the table holds every event the clients saw
    (or `patience` seconds have passed: what is missing then is missing)."""
    deadline = time.monotonic() + patience
    while True:
        async with sessions() as session:
            rows = await session.scalars(
                select(AuditEvent)
                .where(col(AuditEvent.order_id).in_(order_ids))
                .order_by(col(AuditEvent.seq))
            )
            trails: dict[str, list[AuditEvent]] = defaultdict(list)
            for row in rows:
                trails[row.order_id].append(row)
        if all(ledger.orders[o].event_ids <= {row.event_id for row in trails[o]} for o in order_ids):
            return trails
        if time.monotonic() > deadline:
            return trails
        await asyncio.sleep(AUDIT_POLL_SECONDS)


async def lifecycles_started(temporal: Client) -> Counter[str]:
    """How many OrderWorkflow runs each workflow id has had."""
    runs: Counter[str] = Counter()
    async for execution in temporal.list_workflows(f'WorkflowType = "{ORDER_WORKFLOW}"'):
        runs[execution.id] += 1
    return runs


@dataclass(frozen=True)
class Stored:
    """What the system holds about one order."""

    trail: list[AuditEvent]
    order: Order | None
    payments: list[Payment]
    lifecycles: int


async def examine(system: ChaosSystem, ledger: Ledger, patience: float) -> Findings:
    findings = Findings()
    accepted = [order_id for order_id, clock in ledger.orders.items() if clock.accepted_at is not None]
    for order_id, stored in (await load_stored(system.settings, ledger, accepted, patience)).items():
        for problem in problems_of(ledger.orders[order_id], stored):
            findings.add(problem, order_id)
    for name in system.stack.exited():
        findings.add("services that exited by themselves", name)
    return findings


async def load_stored(
    settings: Settings, ledger: Ledger, order_ids: list[str], patience: float
) -> dict[str, Stored]:
    """The audit trail, read-model row, payments and lifecycles of each order."""
    engine = db.create_engine(settings)
    try:
        sessions = db.session_factory(engine)
        trails = await stored_trails(sessions, ledger, order_ids, patience)
        async with sessions() as session:
            orders = {
                o.id: o for o in await session.scalars(select(Order).where(col(Order.id).in_(order_ids)))
            }
            payments: dict[str, list[Payment]] = defaultdict(list)
            for payment in await session.scalars(select(Payment).where(col(Payment.order_id).in_(order_ids))):
                payments[payment.order_id].append(payment)
    finally:
        await engine.dispose()
    runs = await lifecycles_started(await connect_temporal(settings))
    return {o: Stored(trails[o], orders.get(o), payments[o], runs[order_workflow_id(o)]) for o in order_ids}


def problems_of(clock: OrderClock, stored: Stored) -> list[str]:
    """What is wrong with one order (one of PROBLEMS each)."""
    trail = stored.trail
    kinds = Counter(row.type for row in trail)
    ending = next((row for row in reversed(trail) if EventType(row.type).is_terminal), None)
    charged = [p for p in stored.payments if p.status == PaymentStatus.CHARGED]
    numbered = [row.seq for row in trail if row.seq > 0]
    checks = {
        "lost": clock.ending is None
        or ending is None
        or not clock.event_ids <= {row.event_id for row in trail},
        "duplicated effects": stored.lifecycles > 1
        or any(kinds[kind] > 1 for kind in ONCE_PER_ORDER)
        or applied_and_rejected(trail),
        "double charges": len(stored.payments) > 1 or kinds["payment_charged"] > 1,
        "payments not matching the outcome": ending is not None
        and bool(charged) != (ending.type == EventType.COMPLETED.value),
        "seq gaps": bool(clock.sequence_faults) or numbered != list(range(1, len(numbered) + 1)),
        "read-model mismatches": not read_model_agrees(stored.order, trail),
    }
    return [problem for problem, found in checks.items() if found]


def applied_and_rejected(trail: list[AuditEvent]) -> bool:
    """Whether one command both took effect and was rejected (delivered twice, two answers)."""
    rejected = {row.command_id for row in trail if row.type == EventType.COMMAND_REJECTED.value}
    return any(row.command_id in rejected for row in trail if row.type != EventType.COMMAND_REJECTED.value)


def read_model_agrees(order: Order | None, trail: list[AuditEvent]) -> bool:
    """The row's state is that of the newest state-changing event, its last seq that event's seq,
    and its tracking number the newest one the events carry."""
    states = [row for row in trail if EventType(row.type) in STATE_OF_EVENT]
    if order is None or not states:
        return False
    newest = states[-1]
    tracking = [row.data["tracking_number"] for row in trail if "tracking_number" in row.data]
    return (order.state, order.last_event_seq, order.tracking_number) == (
        STATE_OF_EVENT[EventType(newest.type)].value,
        newest.seq,
        tracking[-1] if tracking else None,
    )


def report(outcome: Outcome, findings: Findings, disruptions: int) -> str:
    rows = [
        ("orders offered / accepted", f"{outcome.offered} / {outcome.accepted}"),
        ("disruptions", disruptions),
        (
            "completed / cancelled / failed",
            " / ".join(
                str(outcome.ended(kind))
                for kind in (EventType.COMPLETED, EventType.CANCELLED, EventType.FAILED)
            ),
        ),
        *((problem, findings.count(problem)) for problem in PROBLEMS),
        ("lifecycle p50/p90/p99/max (s)", outcome.lifecycle),
        ("end-to-end p50/p90/p99/max (s)", outcome.end_to_end),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [
        f"{problem}: {', '.join(sorted(findings.problems[problem])[:MAX_FAULTS_SHOWN])}"
        for problem in PROBLEMS
        if findings.count(problem)
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> tuple[Outcome, Findings, int]:
    load = Load(args.orders, args.rate)
    schedule = list(DISRUPTIONS) * args.rounds
    interval = args.orders / args.rate / (len(schedule) + 1)
    ledger = Ledger()
    log_file = Path(tempfile.mkstemp(prefix="orderflow-chaos-", suffix=".log")[1])
    print(f"chaos: {load}, {len(schedule)} disruptions (service logs: {log_file})", file=sys.stderr)
    async with AsyncExitStack() as exits:
        system = await exits.enter_async_context(running_chaos_system(log_file))
        connection = await broker.connect(system.settings, "chaos")
        exits.push_async_callback(connection.close)
        channel, topology = await broker.open_channel(connection)
        api = await exits.enter_async_context(
            httpx.AsyncClient(
                base_url=system.settings.api_url, timeout=30, headers=customer_token(system.settings)
            )
        )
        clients = PatientClients(api, topology, ledger, args.cancel_every)
        # durable: the events published while the broker restarts wait for the clients in it
        events = await channel.declare_queue(EVENTS_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        await events.bind(topology.events, routing_key="order.#")
        await events.consume(clients.on_event)
        await asyncio.gather(offer(clients, ledger, load), disrupt_in_turn(system, schedule, interval))
        await ledger.settle(args.patience)
        await clients.commands_sent()
        findings = await examine(system, ledger, args.patience)
    return Outcome("chaos", load.orders, load.rate, ledger, cpu_seconds={}), findings, len(schedule)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=300, help="how many orders")
    parser.add_argument("--rate", type=float, default=4.0, help="orders placed per second")
    parser.add_argument("--rounds", type=int, default=1, help="times each process and server is disrupted")
    parser.add_argument(
        "--cancel-every",
        type=int,
        default=10,
        metavar="N",
        help="cancel every N-th order as soon as it is placed (0: none)",
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=60.0,
        help="seconds without an order ending before the rest count as lost",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # the clients' own log lines (waiting for a server, reconnecting) would break up the report
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for chatty in ("aio_pika", "aiormq"):
        logging.getLogger(chatty).setLevel(logging.CRITICAL)
    outcome, findings, disruptions = asyncio.run(run(args))
    print(report(outcome, findings, disruptions))
    sys.exit(1 if any(findings.count(problem) for problem in PROBLEMS) else 0)


if __name__ == "__main__":
    main()

"""What the benchmark records about each order, and the figures it derives from that.

Every order gets an `OrderClock`: when the bench offered it, whether the system accepted or shed
it, and when its lifecycle was admitted, waited for approval, went on approved and ended, as its
events date them (the arrival at the bench where a system dates nothing), besides when its end
reached the bench. The `Ledger` also checks the order's events arrive numbered 1, 2, 3, ...
without gaps or repeats. All times are `time.monotonic()` seconds in the bench process. CPU is
counted per process tree with psutil, the PostgreSQL and RabbitMQ servers found by the port they
listen on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit
from uuid import UUID

import psutil

from shared.contracts import EventType
from shared.settings import Settings

CONTRACT_SECONDS = 15.0
"""The contract: every lifecycle ends within 15 s of its admission, the review aside."""
SERVERS = ("postgresql", "rabbitmq")
"""The kinds of process that are the machine's servers, not the system's own."""


@dataclass
class OrderClock:
    placed_at: float
    """When the bench offered the order: the end-to-end clock starts here, for every system."""
    accepted_at: float | None = None
    """When the system took it (broker confirm, 202, queued for a workflow start)."""
    shed: bool = False
    """Refused at the door: negative confirm or 503; not lost, never started."""
    error: str | None = None
    """The placement failed some other way."""
    admitted_at: float | None = None
    """Its lifecycle started (`admitted`)."""
    review_began_at: float | None = None
    """It began to wait for approval (`awaiting_approval`)."""
    approved_at: float | None = None
    """It went on approved (`approved`: after any wait for a slot the review gave back)."""
    finished_at: float | None = None
    """Its lifecycle ended (the terminal event's date)."""
    ended_at: float | None = None
    """Its terminal event reached the bench: the end-to-end clock stops here."""
    ending: EventType | None = None
    approval_requested: bool = False
    next_seq: int = 1
    event_ids: set[UUID] = field(default_factory=set)
    sequence_faults: list[str] = field(default_factory=list)
    redeliveries: int = 0

    @property
    def lifecycle_seconds(self) -> float | None:
        """Admission to end, less the review and the wait for a slot after it (awaiting approval
        → approved, or → end if never approved): the time the contract bounds by 15 s. Timed from
        the placement where a system reports no admission."""
        if self.finished_at is None:
            return None
        started = self.admitted_at if self.admitted_at is not None else self.placed_at
        review = 0.0
        if self.review_began_at is not None:
            went_on = self.approved_at if self.approved_at is not None else self.finished_at
            review = went_on - self.review_began_at
        return self.finished_at - started - review

    def check_sequence(self, seq: int, event_id: UUID, kind: EventType) -> None:
        """Events of one order must arrive as seq 1, 2, 3, ...: a gap, a step back or a seq used
        by two different events is a fault. The same event delivered again (same event id) is
        what the contract allows (at least once): counted apart, then ignored, as a subscriber
        de-duplicating by event id would. Seq 0 belongs to no lifecycle and is not checked."""
        if seq == 0:
            return
        if event_id in self.event_ids:
            self.redeliveries += 1
            return
        self.event_ids.add(event_id)
        if seq != self.next_seq:
            self.sequence_faults.append(f"{kind.value} seq {seq}, expected {self.next_seq}")
        self.next_seq = max(self.next_seq, seq + 1)


class Ledger:
    """The orders of one run, as the bench saw them."""

    def __init__(self) -> None:
        self.orders: dict[str, OrderClock] = {}
        self.sequence_checked = False
        self._ended = asyncio.Event()

    def offer(self, order_id: str) -> OrderClock:
        clock = self.orders[order_id] = OrderClock(placed_at=time.monotonic())
        return clock

    def observe(
        self,
        order_id: str,
        kind: EventType,
        *,
        seq: int | None = None,
        event_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> OrderClock | None:
        """An event of `order_id` arrived now; None if the order is not the bench's.

        The lifecycle's points count from when their events say they happened (`occurred_at`, on
        this machine's clock), as the contract times them: events are published in batches, once
        the workflow task that emitted them is committed. The end to end stops when the terminal
        event arrives."""
        clock = self.orders.get(order_id)
        if clock is None:
            return None
        if seq is not None and event_id is not None:
            self.sequence_checked = True
            clock.check_sequence(seq, event_id, kind)
        now = time.monotonic()
        late = (datetime.now(UTC) - occurred_at).total_seconds() if occurred_at else 0.0
        happened = now - max(late, 0.0)
        if kind is EventType.ADMITTED and clock.admitted_at is None:
            clock.admitted_at = happened
        elif kind is EventType.AWAITING_APPROVAL and clock.review_began_at is None:
            clock.review_began_at = happened
        elif kind is EventType.APPROVED and clock.approved_at is None:
            clock.approved_at = happened
        elif kind.is_terminal and clock.ending is None:
            clock.finished_at, clock.ended_at, clock.ending = happened, now, kind
            self._ended.set()
        return clock

    def open_orders(self) -> int:
        return sum(1 for c in self.orders.values() if c.accepted_at is not None and c.ending is None)

    async def settle(self, patience: float) -> None:
        """Wait until every accepted order has ended, or until none has ended for `patience` s
        (what is still open then counts as lost)."""
        while self.open_orders():
            self._ended.clear()
            try:
                await asyncio.wait_for(self._ended.wait(), patience)
            except TimeoutError:
                return


@dataclass(frozen=True)
class Spread:
    """A distribution's quantiles, in seconds."""

    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        ordered = sorted(values)
        return cls(*(percentile(ordered, f) for f in (0.5, 0.9, 0.99, 1.0)))

    def __str__(self) -> str:
        return " / ".join(f"{v:.2f}" for v in (self.p50, self.p90, self.p99, self.max))


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Outcome:
    """One run's orders, boiled down: what the report prints and the exit status checks."""

    label: str
    offered: int
    offered_rate: float
    ledger: Ledger
    cpu_seconds: dict[str, float]
    """CPU spent over the run by each kind of process counted (the system's, the servers)."""
    baseline: bool = False
    """A run to compare with (bare Temporal, another revision): its problems are notes, not failures."""
    machine_cpu_seconds: float = math.nan
    """CPU spent over the run by every process on the machine."""

    def _clocks(self) -> list[OrderClock]:
        return list(self.ledger.orders.values())

    def _accepted(self) -> list[OrderClock]:
        return [c for c in self._clocks() if c.accepted_at is not None]

    def _ended(self) -> list[OrderClock]:
        return [c for c in self._clocks() if c.ended_at is not None]

    @property
    def accepted(self) -> int:
        return len(self._accepted())

    @property
    def shed(self) -> int:
        return sum(c.shed for c in self._clocks())

    @property
    def errors(self) -> int:
        return sum(c.error is not None for c in self._clocks())

    def ended(self, kind: EventType) -> int:
        return sum(c.ending is kind for c in self._clocks())

    @property
    def lost(self) -> int:
        return sum(c.ending is None for c in self._accepted())

    @property
    def admission_reported(self) -> bool:
        return any(c.admitted_at is not None for c in self._clocks())

    @property
    def out_of_order(self) -> int:
        return sum(bool(c.sequence_faults) for c in self._clocks())

    @property
    def redelivered(self) -> int:
        """Orders that saw one of their events delivered more than once (allowed, but telling)."""
        return sum(c.redeliveries > 0 for c in self._clocks())

    def sequence_faults(self) -> list[str]:
        return [
            f"{order_id}: {fault}"
            for order_id, c in self.ledger.orders.items()
            for fault in c.sequence_faults
        ]

    @property
    def admission_wait(self) -> Spread:
        return Spread.of(c.admitted_at - c.placed_at for c in self._clocks() if c.admitted_at is not None)

    def lifecycle_times(self) -> list[float]:
        return [t for c in self._ended() if (t := c.lifecycle_seconds) is not None]

    @property
    def lifecycle(self) -> Spread:
        return Spread.of(self.lifecycle_times())

    @property
    def end_to_end(self) -> Spread:
        return Spread.of(c.ended_at - c.placed_at for c in self._ended() if c.ended_at is not None)

    @property
    def over_contract(self) -> int:
        return sum(t > CONTRACT_SECONDS for t in self.lifecycle_times())

    @property
    def drain_seconds(self) -> float:
        """First placement offered to last terminal event received."""
        ends = [c.ended_at for c in self._ended() if c.ended_at is not None]
        if not ends:
            return float("nan")
        return max(ends) - min(c.placed_at for c in self._clocks())

    @property
    def throughput(self) -> float:
        """Completed orders per second of drain time: the rate the system kept up, its admission
        wait included; of a burst, its capacity."""
        return self.ended(EventType.COMPLETED) / self.drain_seconds if self.drain_seconds else float("nan")

    def cpu_ms_per_order(self, process: str | None = None) -> float:
        """CPU per accepted order of one kind of process, or of every one counted (None)."""
        seconds = sum(self.cpu_seconds.values()) if process is None else self.cpu_seconds.get(process, 0.0)
        return self._per_order(seconds)

    @property
    def own_cpu_ms_per_order(self) -> float:
        """CPU per accepted order of the system's own processes, the machine's servers aside."""
        return self._per_order(sum(s for kind, s in self.cpu_seconds.items() if kind not in SERVERS))

    @property
    def rest_of_machine_ms_per_order(self) -> float:
        """CPU per accepted order of everything else on the machine meanwhile (the bench itself
        among it): how busy the background was."""
        return self._per_order(self.machine_cpu_seconds - sum(self.cpu_seconds.values()))

    def _per_order(self, seconds: float) -> float:
        return 1000 * seconds / self.accepted if self.accepted else float("nan")

    @property
    def cores_busy(self) -> float:
        """CPU seconds of every process counted per second of drain time."""
        return sum(self.cpu_seconds.values()) / self.drain_seconds if self.drain_seconds else float("nan")

    def problems(self) -> list[str]:
        """What makes the run fail: lost, failed, out-of-order, over 15 s, broken placements."""
        checks = {
            "lost": self.lost,
            "failed": self.ended(EventType.FAILED),
            "out of order": self.out_of_order,
            f"lifecycle over {CONTRACT_SECONDS:g} s": self.over_contract,
            "placement errors": self.errors,
        }
        return [f"{count} {what}" for what, count in checks.items() if count]


def server_pids(settings: Settings) -> dict[str, int]:
    """The PostgreSQL and RabbitMQ servers that `settings` point at, by the process listening on
    their port on this machine."""
    ports = {
        "postgresql": urlsplit(settings.database_url).port or 5432,
        "rabbitmq": urlsplit(settings.amqp_url).port or 5672,
    }
    listening = {
        c.laddr.port: c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr  # () only for a socket with no address
    }
    pids = {}
    for server, port in ports.items():
        if port not in listening:
            raise SystemExit(
                f"nothing on this machine listens on {server}'s port {port}: its CPU cannot be counted"
            )
        pid = listening[port]
        if pid is None:
            raise SystemExit(
                f"the process listening on {server}'s port {port} is not this user's: run the bench as root "
                "to count its CPU"
            )
        pids[server] = pid
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants, those that ended included (a
    process's `children_*` times are its reaped children's)."""
    root = psutil.Process(pid)
    total = 0.0
    # the deepest first: one that ends meanwhile is then counted in its parent's reaped children
    for process in [*reversed(root.children(recursive=True)), root]:
        with suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def cpu_by_kind(pids: dict[str, int], kind_of: Callable[[str], str]) -> dict[str, float]:
    """CPU seconds so far, summed over the process trees of each kind (`bridge-1` + `bridge-2`)."""
    totals: dict[str, float] = {}
    for name, pid in pids.items():
        kind = kind_of(name)
        totals[kind] = totals.get(kind, 0.0) + tree_cpu_seconds(pid)
    return totals


def machine_busy_seconds() -> float:
    """CPU seconds the machine's cores have spent on any process so far (idle and I/O wait aside;
    guest time is inside user time)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {kind: after[kind] - before.get(kind, 0.0) for kind in after}

"""What the benchmark records about each order, and the figures it derives from that.

Every order gets an `OrderClock`: when the bench offered it, whether the system accepted or shed
it, when it was admitted (its `admitted` event), and when and how it ended (its terminal event).
The `Ledger` also checks the order's events arrive numbered 1, 2, 3, ... without gaps or repeats.
All times are `time.monotonic()` seconds in the bench process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from shared.contracts import EventType

CONTRACT_SECONDS = 15.0
"""The contract: every lifecycle ends within 15 s of its start."""


@dataclass
class OrderClock:
    placed_at: float
    """When the bench sent the placement."""
    accepted_at: float | None = None
    """When the system took it (broker confirm, 202, workflow started)."""
    shed: bool = False
    """Refused at the door: negative confirm or 503; not lost, never started."""
    error: str | None = None
    """The placement failed some other way."""
    admitted_at: float | None = None
    ended_at: float | None = None
    ending: EventType | None = None
    approval_requested: bool = False
    reviewer_seconds: float = 0.0
    """How long the bench's reviewer took before approving (`--review-seconds`): not the
    lifecycle's own time, which the contract bounds."""
    next_seq: int = 1
    event_ids: set[UUID] = field(default_factory=set)
    sequence_faults: list[str] = field(default_factory=list)
    redeliveries: int = 0

    @property
    def lifecycle_started_at(self) -> float:
        """Admission when the system reports it; otherwise the placement (no admission stage)."""
        return self.admitted_at if self.admitted_at is not None else self.placed_at

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

        The admission counts from when the event says it happened (`occurred_at`, on this
        machine's clock): its event is published with the lifecycle's first ones, once the
        workflow task that emitted them is committed. The end counts when its event arrives."""
        clock = self.orders.get(order_id)
        if clock is None:
            return None
        if seq is not None and event_id is not None:
            self.sequence_checked = True
            clock.check_sequence(seq, event_id, kind)
        now = time.monotonic()
        if kind is EventType.ADMITTED and clock.admitted_at is None:
            late = (datetime.now(UTC) - occurred_at).total_seconds() if occurred_at else 0.0
            clock.admitted_at = now - max(late, 0.0)
        elif kind.is_terminal and clock.ending is None:
            clock.ended_at, clock.ending = now, kind
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
    baseline: bool = False

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
        return [
            c.ended_at - c.lifecycle_started_at - c.reviewer_seconds
            for c in self._ended()
            if c.ended_at is not None
        ]

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
        """First accepted placement to last terminal event."""
        accepted = [c.accepted_at for c in self._accepted() if c.accepted_at is not None]
        ends = [c.ended_at for c in self._ended() if c.ended_at is not None]
        if not accepted or not ends:
            return float("nan")
        return max(ends) - min(accepted)

    @property
    def throughput(self) -> float:
        """Completed orders per second of drain time: the rate the system sustained."""
        return self.ended(EventType.COMPLETED) / self.drain_seconds if self.drain_seconds else float("nan")

    def cpu_ms_per_order(self, process: str | None = None) -> float:
        """CPU per accepted order of one kind of process, or of all of them (None)."""
        seconds = sum(self.cpu_seconds.values()) if process is None else self.cpu_seconds.get(process, 0.0)
        return 1000 * seconds / self.accepted if self.accepted else float("nan")

    @property
    def cores_busy(self) -> float:
        """CPU seconds of the whole system per second of drain time."""
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / 100.0


def cpu_by_kind(pids: dict[str, int], kind_of: Callable[[str], str]) -> dict[str, float]:
    """CPU seconds so far, summed over the processes of each kind (`bridge-1` + `bridge-2`)."""
    totals: dict[str, float] = {}
    for name, pid in pids.items():
        kind = kind_of(name)
        totals[kind] = totals.get(kind, 0.0) + process_cpu_seconds(pid)
    return totals


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {kind: after[kind] - before.get(kind, 0.0) for kind in after}

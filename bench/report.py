"""The benchmark's printout: runs side by side as columns, ratios beside another revision, the
capacity search's verdict, and orderflow's capacity and CPU against bare Temporal's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bench.measure import CONTRACT_SECONDS, SERVERS, Outcome
from shared.contracts import EventType

PROCESS_ORDER = ("temporal", "workers", "bridge", "audit", "api", "bare-worker", *SERVERS)
HELD_KEEP_UP_FRACTION = 0.95
HELD_END_TO_END_P99_SECONDS = CONTRACT_SECONDS
TARGET_CAPACITY_RATIO = 0.8
"""Issue 18: orderflow's capacity at least this share of bare Temporal's."""
TARGET_CPU_RATIO = 1.5
"""Issue 18: orderflow's CPU per order, every process counted, at most this many times bare Temporal's."""
MAX_FAULTS_SHOWN = 10


Column = Callable[[Outcome], object]


def table(outcomes: list[Outcome]) -> str:
    rows = [(label, [str(value(o)) for o in outcomes]) for label, value in rows_of(outcomes)]
    notes = [
        f"note: {o.label}: no `admitted` events; lifecycle is timed from placement"
        for o in outcomes
        if not o.admission_reported
    ]
    return "\n".join([aligned([o.label for o in outcomes], rows), *notes])


def aligned(headers: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """Rows of cells under their columns' headers, each row's label on the left."""
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(h), *(len(cells[i]) for _, cells in rows)) for i, h in enumerate(headers)]
    lines = [" " * label_width + "".join(f"  {h:>{w}}" for h, w in zip(headers, widths, strict=True))]
    for label, cells in rows:
        row = "".join(f"  {cell:>{w}}" for cell, w in zip(cells, widths, strict=True))
        lines.append(f"{label:<{label_width}}{row}")
    return "\n".join(lines)


def rows_of(outcomes: list[Outcome]) -> list[tuple[str, Column]]:
    return [
        ("orders offered", lambda o: o.offered),
        ("offered rate (orders/s)", lambda o: f"{o.offered_rate:g}"),
        ("accepted", lambda o: o.accepted),
        ("shed (refused at the door)", lambda o: o.shed),
        ("placement errors", lambda o: o.errors),
        *(
            (kind.value, _ended(kind))
            for kind in (EventType.COMPLETED, EventType.CANCELLED, EventType.FAILED)
        ),
        ("lost (accepted, no end)", lambda o: o.lost),
        (
            "out-of-order orders (seq gap/reuse)",
            lambda o: o.out_of_order if o.ledger.sequence_checked else "-",
        ),
        ("orders with an event redelivered", lambda o: o.redelivered if o.ledger.sequence_checked else "-"),
        ("admission wait p50/p90/p99/max (s)", lambda o: o.admission_wait if o.admission_reported else "-"),
        ("lifecycle, review aside, p50/p90/p99/max (s)", lambda o: o.lifecycle),
        ("end-to-end p50/p90/p99/max (s)", lambda o: o.end_to_end),
        (f"lifecycle over {CONTRACT_SECONDS:g} s", lambda o: o.over_contract),
        ("drain time (s)", lambda o: f"{o.drain_seconds:.1f}"),
        ("completed/s over the drain time", lambda o: f"{o.throughput:.2f}"),
        *((f"CPU ms/order {process}", _cpu(process)) for process in processes(outcomes)),
        ("CPU ms/order, every process counted", lambda o: _ms(o.cpu_ms_per_order())),
        ("CPU ms/order, the system's own", lambda o: _ms(o.own_cpu_ms_per_order)),
        ("CPU ms/order, rest of the machine", lambda o: _ms(o.rest_of_machine_ms_per_order)),
        ("CPU cores busy while draining", lambda o: f"{o.cores_busy:.2f}"),
    ]


def _ended(kind: EventType) -> Column:
    return lambda o: o.ended(kind)


def _cpu(process: str) -> Column:
    return lambda o: _ms(o.cpu_ms_per_order(process)) if process in o.cpu_seconds else "-"


def processes(outcomes: list[Outcome]) -> list[str]:
    seen = {kind for o in outcomes for kind in o.cpu_seconds}
    return [p for p in PROCESS_ORDER if p in seen] + sorted(seen - set(PROCESS_ORDER))


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


@dataclass(frozen=True)
class Comparison:
    """The same load on this tree and on another revision, at the same time."""

    this: Outcome
    other: Outcome

    def __str__(self) -> str:
        a, b = self.this, self.other
        return (
            f"{a.label} / {b.label}: completed/s {_ratio(a.throughput, b.throughput)} "
            f"({a.throughput:.2f} vs {b.throughput:.2f}), CPU ms/order, every process counted, "
            f"{_ratio(a.cpu_ms_per_order(), b.cpu_ms_per_order())} "
            f"({_ms(a.cpu_ms_per_order())} vs {_ms(b.cpu_ms_per_order())})"
        )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "-"


def held(outcome: Outcome) -> bool:
    """The capacity search's criterion: completions kept up with the offered rate (timed from the
    first placement, so placements piling up before admission count), end-to-end p99 within 15 s,
    none failed, cancelled or lost."""
    spoiled = outcome.ended(EventType.FAILED) + outcome.ended(EventType.CANCELLED) + outcome.lost
    return (
        outcome.accepted > 0
        and spoiled == 0
        and outcome.throughput >= HELD_KEEP_UP_FRACTION * outcome.offered_rate
        and outcome.end_to_end.p99 <= HELD_END_TO_END_P99_SECONDS
    )


def capacity_verdict(outcomes: list[Outcome]) -> str:
    per_rate = ", ".join(
        f"{o.offered_rate:g}/s {'held' if held(o) else 'NOT held'} ({o.throughput:.2f} completed/s)"
        for o in outcomes
    )
    rates = [o.offered_rate for o in outcomes if held(o)]
    best = f"{max(rates):g} orders/s" if rates else "none of the rates tried"
    return (
        f"{per_rate}\n"
        f"highest rate held (completed/s >= {HELD_KEEP_UP_FRACTION:g} x offered, end-to-end p99 <= "
        f"{HELD_END_TO_END_P99_SECONDS:g} s, none failed/cancelled/lost): {best}"
    )


Figure = tuple[str, Callable[[Outcome], float], str]
"""What a row shows: its label, the figure of one run, and the figure's format."""

SIDE_BY_SIDE: list[Figure] = [
    ("capacity: completed/s, first placement to last end", lambda o: o.throughput, ".2f"),
    ("end-to-end p50 (s)", lambda o: o.end_to_end.p50, ".2f"),
    ("end-to-end p99 (s)", lambda o: o.end_to_end.p99, ".2f"),
    ("end-to-end max (s)", lambda o: o.end_to_end.max, ".2f"),
    ("CPU ms/order, every process counted", lambda o: o.cpu_ms_per_order(), ".0f"),
    ("  of it PostgreSQL and RabbitMQ", lambda o: o.cpu_ms_per_order() - o.own_cpu_ms_per_order, ".0f"),
    ("  of it the system's own processes", lambda o: o.own_cpu_ms_per_order, ".0f"),
    ("CPU ms/order, rest of the machine", lambda o: o.rest_of_machine_ms_per_order, ".0f"),
]


def capacity_ratio(bare: list[Outcome], orderflow: list[Outcome]) -> tuple[str, bool]:
    """Each system's figures, run by run and their spread, and orderflow / bare of each pair of
    runs against the targets; True if every pair meets both."""
    rows = [
        (label, [_runs([value(o) for o in runs], spec) for runs in (bare, orderflow)])
        for label, value, spec in SIDE_BY_SIDE
    ]
    pairs = list(zip(bare, orderflow, strict=True))
    capacity = [o.throughput / b.throughput for b, o in pairs]
    cpu = [o.cpu_ms_per_order() / b.cpu_ms_per_order() for b, o in pairs]
    capacity_met = all(r >= TARGET_CAPACITY_RATIO for r in capacity)
    cpu_met = all(r <= TARGET_CPU_RATIO for r in cpu)
    lines = [
        aligned(["bare Temporal, run by run (spread)", "orderflow, run by run (spread)"], rows),
        "orderflow / bare, pair by pair (each pair ran back to back):",
        f"  capacity {_runs(capacity, '.2f')}: {_verdict(capacity_met)} (target ≥ {TARGET_CAPACITY_RATIO:g})",
        f"  CPU per order {_runs(cpu, '.2f')}: {_verdict(cpu_met)} (target ≤ {TARGET_CPU_RATIO:g})",
    ]
    return "\n".join(lines), capacity_met and cpu_met


def _runs(values: list[float], spec: str) -> str:
    each = ", ".join(format(v, spec) for v in values)
    return f"{each} ({format(min(values), spec)} to {format(max(values), spec)})"


def _verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def sequence_faults(outcomes: list[Outcome]) -> str:
    lines = []
    for outcome in outcomes:
        faults = outcome.sequence_faults()
        lines += [f"{outcome.label}: {fault}" for fault in faults[:MAX_FAULTS_SHOWN]]
        if len(faults) > MAX_FAULTS_SHOWN:
            lines.append(f"{outcome.label}: ... {len(faults) - MAX_FAULTS_SHOWN} more")
    return "\n".join(lines)

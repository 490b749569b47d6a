"""The benchmark's printout: runs side by side as columns, ratios against the baseline, and the
capacity search's verdict."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bench.measure import Outcome
from shared.contracts import EventType

PROCESS_ORDER = ("temporal", "workers", "bridge", "audit", "api", "bare-worker")
HELD_LIFECYCLE_P99_SECONDS = 5.0
KEPT_UP_ADMISSION_P99_SECONDS = 5.0
MAX_FAULTS_SHOWN = 10


Column = Callable[[Outcome], object]


def table(outcomes: list[Outcome]) -> str:
    rows = [(label, [str(value(o)) for o in outcomes]) for label, value in rows_of(outcomes)]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(o.label), *(len(values[i]) for _, values in rows)) for i, o in enumerate(outcomes)]
    lines = [" " * label_width + "".join(f"  {o.label:>{w}}" for o, w in zip(outcomes, widths, strict=True))]
    for label, values in rows:
        cells = "".join(f"  {v:>{w}}" for v, w in zip(values, widths, strict=True))
        lines.append(f"{label:<{label_width}}{cells}")
    notes = [
        f"note: {o.label}: no `admitted` events; lifecycle is timed from placement"
        for o in outcomes
        if not o.admission_reported
    ]
    return "\n".join(lines + notes)


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
        ("lifecycle p50/p90/p99/max (s)", lambda o: o.lifecycle),
        ("end-to-end p50/p90/p99/max (s)", lambda o: o.end_to_end),
        ("lifecycle over 15 s", lambda o: o.over_contract),
        ("drain time (s)", lambda o: f"{o.drain_seconds:.1f}"),
        ("throughput (completed/s)", lambda o: f"{o.throughput:.2f}"),
        *((f"CPU ms/order {process}", _cpu(process)) for process in processes(outcomes)),
        ("CPU ms/order total", lambda o: _ms(o.cpu_ms_per_order())),
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
    pipeline: Outcome
    baseline: Outcome

    def __str__(self) -> str:
        p, b = self.pipeline, self.baseline
        return (
            f"{p.label} / {b.label}: throughput {_ratio(p.throughput, b.throughput)} "
            f"({p.throughput:.2f} vs {b.throughput:.2f} completed/s), CPU ms/order "
            f"{_ratio(p.cpu_ms_per_order(), b.cpu_ms_per_order())} "
            f"({_ms(p.cpu_ms_per_order())} vs {_ms(b.cpu_ms_per_order())})"
        )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "-"


def held(outcome: Outcome) -> bool:
    """The capacity search's criterion: lifecycle p99 within 5 s, nothing failed, cancelled or lost."""
    spoiled = outcome.ended(EventType.FAILED) + outcome.ended(EventType.CANCELLED) + outcome.lost
    return outcome.accepted > 0 and spoiled == 0 and outcome.lifecycle.p99 <= HELD_LIFECYCLE_P99_SECONDS


def kept_up(outcome: Outcome) -> bool:
    """Held, and placements did not pile up waiting for admission (admission wait p99 within 5 s)."""
    waited = outcome.admission_wait.p99 if outcome.admission_reported else 0.0
    return held(outcome) and outcome.shed == 0 and waited <= KEPT_UP_ADMISSION_P99_SECONDS


def capacity_verdict(outcomes: list[Outcome]) -> str:
    def best(criterion: Callable[[Outcome], bool]) -> str:
        rates = [o.offered_rate for o in outcomes if criterion(o)]
        return f"{max(rates):g} orders/s" if rates else "none of the rates tried"

    per_rate = ", ".join(f"{o.offered_rate:g}/s {'held' if held(o) else 'NOT held'}" for o in outcomes)
    return (
        f"{per_rate}\n"
        f"highest rate held (lifecycle p99 <= {HELD_LIFECYCLE_P99_SECONDS:g} s, none failed/cancelled/lost): "
        f"{best(held)}\n"
        f"highest rate also kept up with (nothing shed, admission wait p99 <= "
        f"{KEPT_UP_ADMISSION_P99_SECONDS:g} s): {best(kept_up)}"
    )


def sequence_faults(outcomes: list[Outcome]) -> str:
    lines = []
    for outcome in outcomes:
        faults = outcome.sequence_faults()
        lines += [f"{outcome.label}: {fault}" for fault in faults[:MAX_FAULTS_SHOWN]]
        if len(faults) > MAX_FAULTS_SHOWN:
            lines.append(f"{outcome.label}: ... {len(faults) - MAX_FAULTS_SHOWN} more")
    return "\n".join(lines)

"""Orders through the whole pipeline, with the real fault injector, timed from offer to end.

Starts its own system (Temporal dev server, api, bridge(s), workers, audit: the `make run`
launcher) on a database and RabbitMQ vhost of its own, places orders, approves each through the
command queue when its `awaiting_approval` event arrives, and follows every order on
`orders.events`.

Steady load (the default): N orders at a steady rate; one run per attempt variant, one after the other

    python bench/lifecycle.py --orders 200 --rate 4
    python bench/lifecycle.py --orders 200 --rate 4 --variants 1:0.5,2:0.5

Burst: N orders offered as fast as the broker (or with `--via api` the REST gateway) takes them,
at most --burst-rate a second; what the system refuses at the door (negative confirm, 503) is shed

    python bench/lifecycle.py --burst 200 --burst-rate 100
    python bench/lifecycle.py --burst 500 --via api --bridges 2 --workers 2

Capacity search: a steady run of --duration seconds at each rate, and the highest rate held: the
completions kept up (completed/s from the first placement to the last end at least 0.95 x the
offered rate, so a backlog waiting for admission counts), end-to-end p99 within 15 s, none failed,
cancelled or lost

    python bench/lifecycle.py --capacity 6,8,10 --duration 120

Capacity against bare Temporal: the same burst drained by bare Temporal
(bench/bare_lifecycle.py: the lifecycle's steps, child, signal and deadline with the same fault
injector, no broker, no database, at most as many lifecycles at once as orderflow admits) and by
orderflow, one after the other, --repeats times (bare, orderflow, bare, orderflow, ...: each has
the machine to itself, and the pairs show how much the machine drifts). Prints each system's
capacity (completed/s from the first placement to the last end), end-to-end p50/p99/max and CPU
per order, run by run with their spread, and orderflow / bare of each pair against the targets
(capacity >= 0.8, CPU per order <= 1.5)

    python bench/lifecycle.py --capacity-ratio --burst 600 --repeats 2
    python bench/lifecycle.py --burst 60 --baseline-only     # bare Temporal on its own

Beside another revision: add `--beside <checkout>` (a git worktree of it) to run each load on
that revision's services at the same time as on this tree's, each its own system, and print the
ratios this / beside. Both share the machine at once, so its drift from minute to minute, which
is larger than most changes, does not tell them apart; offer half what one system sustains. This
tree's migrations migrate both databases, so the other tree's must be an earlier part of them.
    python bench/lifecycle.py --orders 240 --rate 3 --beside /tmp/wt-before

Reviewers who take their time: `--review-seconds S` approves each order S seconds after it awaits
approval, so that orders pile up in review (beside a revision whose orders kept their admission
slot in review, it shows what that cost)

    python bench/lifecycle.py --orders 240 --rate 4 --review-seconds 5 --beside /tmp/wt-before

A variant is PARALLEL_ATTEMPTS:ATTEMPT_TIMEOUT_SECONDS; the default is the shipped configuration.
`--bridges N --workers N` run that many of each service; `--repeats N` runs every load N times.

Prints per run: offered / accepted / shed, completed / cancelled / failed / lost (accepted, no
terminal event within --patience seconds of the last one), orders whose events did not arrive as
seq 1, 2, 3, ... (a gap, a step back, one seq on two different events) and orders that saw an
event delivered twice (the same event id: at least once, as the contract allows, so reported but
not a failure), as p50/p90/p99/max: the admission wait (offered → `admitted`), the lifecycle as
the contract times it (`admitted` → terminal event as the events date them, less the review:
`awaiting_approval` → `approved`, the wait for a slot after the approval included) and the end to
end (offered → terminal event received); the drain time (first offered → last terminal event)
and the completed orders per second of it; the CPU per accepted order of each kind of process
(all instances of a service summed, each with its child processes), of PostgreSQL and RabbitMQ
(every process of the servers listening on the configured ports), of all those, of the system's
own, and of the rest of the machine meanwhile (the bench itself among it); and the cores busy.

Exits non-zero if any order of the pipeline was lost, failed or out of order, took longer than
15 s as the contract times it, or could not be placed for a reason other than shedding; in a
capacity search also when no rate was held; against bare Temporal also when a target is missed.
Bare Temporal's and the other revision's own problems are printed as notes, unless bare Temporal
ran alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a file

from bench import report
from bench.baseline import running_baseline
from bench.load import Load, SystemUnderTest, offer
from bench.measure import Ledger, Outcome, cpu_spent, machine_busy_seconds
from bench.pipeline import Entry, PipelineConfig, Variant, running_pipeline
from shared.settings import Settings

SystemFactory = Callable[[Ledger], AbstractAsyncContextManager[SystemUnderTest]]


@dataclass(frozen=True)
class Trial:
    """One column of the report: a load on one system."""

    label: str
    load: Load
    config: PipelineConfig
    bare: bool = False
    """On bare Temporal (bench/bare_lifecycle.py) with the config's variant, not on orderflow."""
    beside: Trial | None = None
    """The same load on another revision, at the same time."""

    def system(self) -> SystemFactory:
        if self.bare:
            settings = self.config.variant.applied_to(Settings())
            return lambda ledger: running_baseline(settings, ledger)
        return lambda ledger: running_pipeline(self.config, ledger)

    def on_bare_temporal(self) -> Trial:
        return replace(self, label=f"bare {self.label}", bare=True)


async def measure(trial: Trial, patience: float, *, reference: bool) -> Outcome:
    """Offer the trial's load to a fresh system and follow every order to its end."""
    print(f"running {trial.label}: {trial.load} ...", file=sys.stderr)
    ledger = Ledger()
    async with trial.system()(ledger) as system:
        before, machine_before = system.cpu_seconds(), machine_busy_seconds()
        await offer(system, ledger, trial.load)
        await ledger.settle(patience)
        after, machine_after = system.cpu_seconds(), machine_busy_seconds()
    return Outcome(
        trial.label,
        trial.load.orders,
        trial.load.rate,
        ledger,
        cpu_spent(before, after),
        baseline=reference,
        machine_cpu_seconds=machine_after - machine_before,
    )


async def run_trials(trials: list[Trial], patience: float) -> tuple[list[Outcome], list[report.Comparison]]:
    outcomes, comparisons = [], []
    for trial in trials:
        if trial.beside is None:
            outcomes.append(await measure(trial, patience, reference=trial.bare))
            continue
        here, there = await asyncio.gather(
            measure(trial, patience, reference=False), measure(trial.beside, patience, reference=True)
        )
        comparisons.append(report.Comparison(here, there))
        outcomes += [here, there]
    return outcomes, comparisons


def trials_of(args: argparse.Namespace) -> list[Trial]:
    configs = [
        PipelineConfig(
            Variant.parse(v),
            bridges=args.bridges,
            workers=args.workers,
            entry=args.via,
            review_seconds=args.review_seconds,
        )
        for v in args.variants.split(",")
    ]
    if args.capacity:
        if len(configs) > 1:
            raise SystemExit("--capacity takes one variant")
        rates = [float(r) for r in args.capacity.split(",")]
        trials = [
            Trial(f"{rate:g}/s", Load(max(1, round(rate * args.duration)), rate), configs[0])
            for rate in rates
        ]
    else:
        load = Load(args.burst, args.burst_rate, burst=True) if args.burst else Load(args.orders, args.rate)
        trials = [Trial(str(config), load, config) for config in configs]
    if args.capacity_ratio:  # bare Temporal first, then orderflow, each alone on the machine
        trials = [twin for trial in trials for twin in (trial.on_bare_temporal(), trial)]
    elif args.baseline_only:
        trials = [trial.on_bare_temporal() for trial in trials]
    if args.repeats == 1:
        return trials
    return [replace(t, label=f"{t.label} #{n}") for n in range(1, args.repeats + 1) for t in trials]


def beside(trials: list[Trial], tree: Path) -> list[Trial]:
    """Each trial with its twin on the revision checked out at `tree`."""
    here = Path(__file__).resolve().parents[1]
    # this tree migrates both: an earlier revision runs on the schema that grew from its own
    theirs, ours = migrations(tree), migrations(here)
    if theirs != ours[: len(theirs)]:
        raise SystemExit(f"--beside: {tree}'s migrations are not an earlier part of this tree's")
    twins = []
    for trial in trials:
        config = replace(trial.config, tree=tree)
        twins.append(replace(trial, beside=Trial(f"{trial.label} @{tree.name}", trial.load, config)))
    return twins


def migrations(tree: Path) -> list[str]:
    return sorted(path.name for path in (tree / "migrations" / "versions").glob("*.py"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    load = parser.add_argument_group("load (steady by default)")
    load.add_argument("--orders", type=int, default=200, help="steady: how many orders")
    load.add_argument("--rate", type=float, default=4.0, help="steady: orders placed per second")
    load.add_argument("--burst", type=int, metavar="N", help="offer N orders as fast as they are taken")
    load.add_argument("--burst-rate", type=float, default=100.0, help="burst: at most this many a second")
    load.add_argument(
        "--capacity", metavar="RATE[,RATE...]", help="steady runs at each rate, one after the other"
    )
    load.add_argument("--duration", type=float, default=120.0, help="capacity: seconds of load per rate")
    load.add_argument("--repeats", type=int, default=1, help="run every load this many times, in turn")
    system = parser.add_argument_group("system")
    system.add_argument(
        "--via", choices=list(Entry), default=Entry.BROKER, type=Entry, help="where placements go in"
    )
    system.add_argument("--bridges", type=int, default=1, help="bridge processes")
    system.add_argument("--workers", type=int, default=1, help="worker processes")
    system.add_argument(
        "--review-seconds",
        type=float,
        default=0.0,
        help="the reviewer approves each order this long after it awaits approval (a person: minutes)",
    )
    system.add_argument(
        "--variants",
        default=Variant.shipped().spec(),
        help="comma-separated PARALLEL_ATTEMPTS:ATTEMPT_TIMEOUT_SECONDS; one run each, one after the other",
    )
    system.add_argument(
        "--beside", type=Path, metavar="CHECKOUT", help="also run each load, at once, on another revision"
    )
    system.add_argument(
        "--capacity-ratio",
        action="store_true",
        help="drain the burst on bare Temporal and on orderflow in turn, and compare their capacity and CPU",
    )
    system.add_argument("--baseline-only", action="store_true", help="run each load on bare Temporal only")
    parser.add_argument(
        "--patience",
        type=float,
        default=60.0,
        help="seconds without an order ending before the rest count as lost",
    )
    args = parser.parse_args()
    if args.burst and args.capacity:
        parser.error("--burst and --capacity are different modes")
    if args.capacity_ratio and not args.burst:
        parser.error("--capacity-ratio compares the drain rates of a burst: give --burst N")
    if args.repeats < 1:
        parser.error("--repeats is at least 1")
    bare = args.capacity_ratio or args.baseline_only
    if args.beside and bare:
        parser.error("--beside compares two revisions of orderflow, not orderflow with bare Temporal")
    if args.review_seconds and bare:
        parser.error("--review-seconds is orderflow's reviewer; on bare Temporal orders are approved at once")
    return args


def main() -> None:
    args = parse_args()
    # the bench's own log lines (a client waiting for a server to start) would break up the report
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    trials = trials_of(args)
    if args.beside:
        trials = beside(trials, args.beside.resolve())
    outcomes, comparisons = asyncio.run(run_trials(trials, args.patience))
    print(report.table(outcomes))
    for comparison in comparisons:
        print(f"this tree / beside  {comparison}")
    ok = passed(outcomes)
    if args.capacity:
        print(report.capacity_verdict(judged(outcomes)))
        if not any(report.held(o) for o in judged(outcomes)):
            print("FAIL no rate was held", file=sys.stderr)
            ok = False
    if args.capacity_ratio:
        bound = Settings().max_running_lifecycles
        print(f"capacity and CPU, the same burst, at most {bound} lifecycles at once in each system:")
        ratios, met = report.capacity_ratio(
            [o for o in outcomes if o.baseline], [o for o in outcomes if not o.baseline]
        )
        print(ratios)
        if not met:
            print("FAIL orderflow misses a target against bare Temporal", file=sys.stderr)
            ok = False
    sys.exit(0 if ok else 1)


def judged(outcomes: list[Outcome]) -> list[Outcome]:
    """The runs the exit status stands for: the pipeline's (bare Temporal's when it ran alone)."""
    return [o for o in outcomes if not o.baseline] or outcomes


def passed(outcomes: list[Outcome]) -> bool:
    """Print what went wrong; True if nothing that counts did."""
    ok = True
    faults = report.sequence_faults(outcomes)
    if faults:
        print(f"events out of order:\n{faults}", file=sys.stderr)
    for outcome in outcomes:
        if problems := outcome.problems():
            counts = outcome in judged(outcomes)
            print(f"{'FAIL' if counts else 'note'} {outcome.label}: {', '.join(problems)}", file=sys.stderr)
            ok = ok and not counts
    return ok


if __name__ == "__main__":
    main()

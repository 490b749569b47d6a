"""Orders through the whole pipeline, with the real fault injector, timed from command to end.

Starts its own system (Temporal dev server, api, bridge(s), workers, audit: the `make run`
launcher) on a database and RabbitMQ vhost of its own, places orders, approves each through the
command queue when its `awaiting_approval` event arrives, and follows every order on
`orders.events`.

Steady load (the default): N orders at a steady rate; one run per attempt variant, side by side

    python bench/lifecycle.py --orders 200 --rate 4
    python bench/lifecycle.py --orders 200 --rate 4 --variants 1:0.5,2:0.5

Burst: N orders offered as fast as the broker (or with `--via api` the REST gateway) takes them,
at most --burst-rate a second; what the system refuses at the door (negative confirm, 503) is shed

    python bench/lifecycle.py --burst 200 --burst-rate 100
    python bench/lifecycle.py --burst 500 --via api --bridges 2 --workers 2

Capacity search: a steady run of --duration seconds at each rate, side by side, and the highest
rate held (lifecycle p99 <= 5 s, none failed, cancelled or lost)

    python bench/lifecycle.py --capacity 3,4,5,6 --duration 120

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

Baseline: add `--baseline` to any of these to run the same load on the same lifecycle's shape on
bare Temporal (bench/bare_lifecycle.py: no broker, no database, the same fault injector and step
loop) and print the ratios pipeline / baseline of throughput and CPU per order

    python bench/lifecycle.py --orders 30 --rate 4 --baseline
    python bench/lifecycle.py --orders 30 --rate 4 --baseline-only     # the baseline on its own

A variant is PARALLEL_ATTEMPTS:ATTEMPT_TIMEOUT_SECONDS; the default is the shipped configuration.
`--bridges N --workers N` run that many of each service.

Prints per run: offered / accepted / shed, completed / cancelled / failed / lost (accepted, no
terminal event within --patience seconds of the last one), orders whose events did not arrive as
seq 1, 2, 3, ... (a gap, a step back, one seq on two different events) and orders that saw an
event delivered twice (the same event id: at least once, as the contract allows, so reported but
not a failure), the admission wait (placed → `admitted`, as the event dates it), the
lifecycle time (`admitted` → terminal event, the time `--review-seconds` adds aside) and the
end-to-end time (placed → terminal) as p50/p90/p99/max, the drain time (first accepted → last
terminal event), the throughput (completed orders per second of drain time), the CPU per accepted
order of each kind of process (all instances of a service summed), and the cores the whole system
kept busy while it drained.

Exits non-zero if any order of the pipeline was lost, failed or out of order, took longer than
15 s from admission to its end, or could not be placed for a reason other than shedding; in a
capacity search also when no rate was held. The baseline's own problems are printed as notes (it
has no admission, so a burst overloads it), unless it ran alone.
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
from bench.measure import Ledger, Outcome, cpu_spent
from bench.pipeline import Entry, PipelineConfig, Variant, running_pipeline
from shared.settings import Settings

SystemFactory = Callable[[Ledger], AbstractAsyncContextManager[SystemUnderTest]]


@dataclass(frozen=True)
class Trial:
    """One column of the report: a load on one configuration."""

    label: str
    load: Load
    config: PipelineConfig
    beside: Trial | None = None
    """The same load on another revision, at the same time."""

    def pipeline(self) -> SystemFactory:
        return lambda ledger: running_pipeline(self.config, ledger)

    def baseline(self) -> SystemFactory:
        policy = self.config.variant.applied_to(Settings()).lifecycle_policy()
        return lambda ledger: running_baseline(policy, ledger)


async def measure(
    label: str, system_of: SystemFactory, load: Load, patience: float, *, baseline: bool
) -> Outcome:
    """Offer `load` to a fresh system and follow every order to its end."""
    print(f"running {label}: {load} ...", file=sys.stderr)
    ledger = Ledger()
    async with system_of(ledger) as system:
        before = system.cpu_seconds()
        await offer(system, ledger, load)
        await ledger.settle(patience)
        after = system.cpu_seconds()
    return Outcome(label, load.orders, load.rate, ledger, cpu_spent(before, after), baseline=baseline)


async def run_trials(
    trials: list[Trial], patience: float, *, pipeline: bool = True, baseline: bool = False
) -> tuple[list[Outcome], list[report.Comparison]]:
    outcomes, comparisons = [], []
    for trial in trials:
        if trial.beside is not None:
            here, there = await asyncio.gather(
                measure(trial.label, trial.pipeline(), trial.load, patience, baseline=False),
                measure(trial.beside.label, trial.beside.pipeline(), trial.load, patience, baseline=True),
            )
            comparisons.append(report.Comparison(here, there))
            outcomes += [here, there]
            continue
        ran = []
        if pipeline:
            ran.append(await measure(trial.label, trial.pipeline(), trial.load, patience, baseline=False))
        if baseline:
            ran.append(
                await measure(f"bare {trial.label}", trial.baseline(), trial.load, patience, baseline=True)
            )
        if len(ran) == 2:
            comparisons.append(report.Comparison(*ran))
        outcomes += ran
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
        return [
            Trial(f"{rate:g}/s", Load(max(1, round(rate * args.duration)), rate), configs[0])
            for rate in rates
        ]
    load = Load(args.burst, args.burst_rate, burst=True) if args.burst else Load(args.orders, args.rate)
    return [Trial(str(config), load, config) for config in configs]


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
    load.add_argument("--capacity", metavar="RATE[,RATE...]", help="steady runs at each rate, side by side")
    load.add_argument("--duration", type=float, default=120.0, help="capacity: seconds of load per rate")
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
        help="comma-separated PARALLEL_ATTEMPTS:ATTEMPT_TIMEOUT_SECONDS; one run each, side by side",
    )
    system.add_argument(
        "--beside", type=Path, metavar="CHECKOUT", help="also run each load, at once, on another revision"
    )
    system.add_argument("--baseline", action="store_true", help="also run each load on bare Temporal")
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
    if args.beside and (args.baseline or args.baseline_only):
        parser.error("--beside compares two revisions; run --baseline on its own")
    if args.review_seconds and (args.baseline or args.baseline_only):
        parser.error("--review-seconds is the pipeline's reviewer; the baseline approves at once")
    return args


def main() -> None:
    args = parse_args()
    # the bench's own log lines (a client waiting for a server to start) would break up the report
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    trials = trials_of(args)
    if args.beside:
        trials = beside(trials, args.beside.resolve())
    outcomes, comparisons = asyncio.run(
        run_trials(
            trials,
            args.patience,
            pipeline=not args.baseline_only,
            baseline=args.baseline or args.baseline_only,
        )
    )
    print(report.table(outcomes))
    for comparison in comparisons:
        print(f"{'this tree / beside' if args.beside else 'pipeline / baseline'}  {comparison}")
    if args.capacity:
        print(report.capacity_verdict(judged(outcomes)))
    sys.exit(0 if passed(outcomes, capacity_search=bool(args.capacity)) else 1)


def judged(outcomes: list[Outcome]) -> list[Outcome]:
    """The runs the exit status stands for: the pipeline's (the baseline's when it ran alone)."""
    return [o for o in outcomes if not o.baseline] or outcomes


def passed(outcomes: list[Outcome], *, capacity_search: bool) -> bool:
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
    if capacity_search and not any(report.held(o) for o in judged(outcomes)):
        print("FAIL no rate was held", file=sys.stderr)
        ok = False
    return ok


if __name__ == "__main__":
    main()

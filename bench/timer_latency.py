"""How late the dev server fires a short workflow timer, beside how soon it starts an activity.

    .venv/bin/python -m bench.timer_latency [--runs 10]

Why events are published by an activity and not after a commit timer (services/workers/outbox.py,
docs/performance.md): on this dev server (the `temporal` binary `make run` uses, with its SQLite
settings) a 1 ms timer fires about a second after it starts. Each run is a workflow that sleeps
1 ms, then one that runs an empty activity; the figures are the history's own times (timer started
→ fired, activity scheduled → completed), as p50 and max over --runs of each.

Not a test: it prints figures. It starts a dev server of its own (in memory) and a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

TEMPORAL_BINARY = Path(sys.executable).parent / "temporal"
TASK_QUEUE = "timer-latency"


@activity.defn
async def nothing() -> None:
    return None


@workflow.defn
class SleepsOneMillisecond:
    @workflow.run
    async def run(self) -> None:
        await workflow.sleep(timedelta(milliseconds=1))


@workflow.defn
class RunsAnActivity:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(nothing, start_to_close_timeout=timedelta(seconds=5))


def seconds_between(
    events: list[HistoryEvent], first: EventType.ValueType, then: EventType.ValueType
) -> float:
    """From the first event of type `first` to the first of type `then`."""
    start = next(event for event in events if event.event_type == first)
    end = next(event for event in events if event.event_type == then)
    return (end.event_time.ToDatetime() - start.event_time.ToDatetime()).total_seconds()


async def history(client: Client, workflow_id: str) -> list[HistoryEvent]:
    handle = client.get_workflow_handle(workflow_id)
    return [event async for event in handle.fetch_history_events()]


async def measure(client: Client, runs: int) -> dict[str, list[float]]:
    delays: dict[str, list[float]] = {
        "1 ms timer: started → fired": [],
        "activity: scheduled → completed": [],
    }
    for _ in range(runs):
        timer_id, activity_id = f"timer-{uuid4()}", f"activity-{uuid4()}"
        await client.execute_workflow(SleepsOneMillisecond.run, id=timer_id, task_queue=TASK_QUEUE)
        await client.execute_workflow(RunsAnActivity.run, id=activity_id, task_queue=TASK_QUEUE)
        timer = await history(client, timer_id)
        ran = await history(client, activity_id)
        delays["1 ms timer: started → fired"].append(
            seconds_between(timer, EventType.EVENT_TYPE_TIMER_STARTED, EventType.EVENT_TYPE_TIMER_FIRED)
        )
        delays["activity: scheduled → completed"].append(
            seconds_between(
                ran,
                EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
                EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
            )
        )
    return delays


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BINARY),
        dev_server_log_level="error",
        dev_server_extra_args=["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=off"],
    )
    try:
        async with Worker(
            env.client,
            task_queue=TASK_QUEUE,
            workflows=[SleepsOneMillisecond, RunsAnActivity],
            activities=[nothing],
        ):
            delays = await measure(env.client, args.runs)
    finally:
        await env.shutdown()
    for what, seconds in delays.items():
        print(
            f"{what:34} p50 {statistics.median(seconds) * 1000:7.1f} ms   max {max(seconds) * 1000:7.1f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())

"""Record the workflow histories that `test_replay.py` replays.

    .venv/bin/python tests/record_histories.py

Runs each scenario of `workflow_harness` on a time-skipping test server of its own, with the real
workflows and mocked activities, and writes the order workflow's history and each of its
shipments' to `tests/histories/<workflow id>.json` (the file name is the workflow id, which a
replay needs and the JSON does not hold). Re-record after an intended change to what the
workflows do, and commit the files with that change.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also run as `python -m tests.record_histories`

from workflow_harness import (  # noqa: E402
    OrderHarness,
    cancel_after_payment_scenario,
    dispatch_retry_scenario,
    happy_path_scenario,
    order_harness,
    own_time_skipping_env,
)

HISTORIES = Path(__file__).resolve().parent / "histories"

Scenario = Callable[[OrderHarness], Awaitable[object]]
SCENARIOS: dict[str, Scenario] = {
    "replay-happy-path": happy_path_scenario,
    "replay-cancel-after-payment": cancel_after_payment_scenario,
    "replay-dispatch-retry": dispatch_retry_scenario,
}


async def record(order_id: str, scenario: Scenario) -> list[Path]:
    async with own_time_skipping_env() as env, order_harness(env.client, order_id=order_id) as harness:
        await scenario(harness)
        workflow_ids = [harness.workflow_id]
        attempt = 1
        while await harness.shipment_status(attempt) is not None:
            workflow_ids.append(harness.shipment_id(attempt))
            attempt += 1
        written = []
        for workflow_id in workflow_ids:
            history = await env.client.get_workflow_handle(workflow_id).fetch_history()
            path = HISTORIES / f"{workflow_id}.json"
            path.write_text(history.to_json() + "\n")
            written.append(path)
        return written


async def main() -> None:
    HISTORIES.mkdir(exist_ok=True)
    for stale in HISTORIES.glob("*.json"):
        stale.unlink()
    for order_id, scenario in SCENARIOS.items():
        for path in await record(order_id, scenario):
            print(f"recorded {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    asyncio.run(main())

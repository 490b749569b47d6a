"""Record the workflow histories that `test_replay.py` replays.

    .venv/bin/python tests/record_histories.py

Runs each scenario of `workflow_harness` on a time-skipping test server of its own, with the real
workflows and mocked activities, and writes the order workflow's history and each of its
shipments' to `tests/histories/<workflow id>.json` (the file name is the workflow id, which a
replay needs and the JSON does not hold). The attempts are production's (three in flight, 0.3 s
each) and the business steps' mocks fail, hang or pass like the fault injector, so the histories
hold failed, timed-out and cancelled attempts. The payloads are encrypted, as in production, under
the tests' key (`payload_keys.py`). Re-record after an intended change to what the workflows do,
and commit the files with that change.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

# the harness as the tests import it, and the repository's root for testsupport, however this is run
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_harness import (
    PRODUCTION_ATTEMPTS,
    OrderHarness,
    cancel_after_payment_scenario,
    deadline_scenario,
    dispatch_retry_scenario,
    early_commands_scenario,
    flaky,
    happy_path_scenario,
    order_harness,
    own_time_skipping_env,
    temporal_cancel_scenario,
)

HISTORIES = Path(__file__).resolve().parent / "histories"

Scenario = Callable[[OrderHarness], Awaitable[object]]
SCENARIOS: dict[str, Scenario] = {
    "replay-happy-path": happy_path_scenario,
    "replay-cancel-after-payment": cancel_after_payment_scenario,
    "replay-dispatch-retry": dispatch_retry_scenario,
    "replay-early-commands": early_commands_scenario,
    "replay-temporal-cancel": temporal_cancel_scenario,
    "replay-deadline": deadline_scenario,
}


async def record(order_id: str, scenario: Scenario, seed: int) -> list[Path]:
    async with (
        own_time_skipping_env() as env,
        order_harness(
            env.client, order_id=order_id, unscripted=flaky(seed), policy=PRODUCTION_ATTEMPTS
        ) as harness,
    ):
        await scenario(harness)
        written = []
        for workflow_id, history in (await harness.histories()).items():
            path = HISTORIES / f"{workflow_id}.json"
            path.write_text(history.to_json() + "\n")
            written.append(path)
        return written


async def main() -> None:
    HISTORIES.mkdir(exist_ok=True)
    for stale in HISTORIES.glob("*.json"):
        stale.unlink()
    for seed, (order_id, scenario) in enumerate(SCENARIOS.items()):
        for path in await record(order_id, scenario, seed):
            print(f"recorded {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    asyncio.run(main())

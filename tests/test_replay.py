"""Recorded histories still replay on today's workflow code: no nondeterminism.

`tests/histories/*.json` are real histories of OrderWorkflow and its ShippingWorkflow children
(happy path, cancel after payment, a dispatch failure shipped again, a start with early commands,
a cancellation through Temporal, the deadline), recorded from the scenarios in
`workflow_harness.py` with production's attempts: three in flight, failed, timed-out and
cancelled ones among them. The workflows change freely (no `workflow.patched`): a change to what
they do records them again in the same commit:

    .venv/bin/python tests/record_histories.py

Replay runs through the payload codec, as the workers do: histories are recorded encrypted under
the tests' key (`payload_keys.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowRunner

from payload_keys import TEST_DATA_CONVERTER
from record_histories import HISTORIES, SCENARIOS
from services.workers.activity_interface import OrderActivities
from services.workers.order_workflow import OrderWorkflow
from services.workers.shipping_workflow import ShippingWorkflow
from services.workers.worker import sandbox_runner
from shared.contracts import OrderStatus, Step
from shared.lifecycle import ORDER_WORKFLOW, OrderWorkflowInput, order_workflow_id

RECORDED = sorted(HISTORIES.rglob("*.json"))
CLOSED = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
}


def load(path: Path) -> WorkflowHistory:
    # the file name is the workflow id: replay needs it, since the child ids derive from it
    return WorkflowHistory.from_json(path.stem, path.read_text())


def replayer(*workflows: type, runner: WorkflowRunner | None = None) -> Replayer:
    return Replayer(
        workflows=list(workflows),
        data_converter=TEST_DATA_CONVERTER,
        workflow_runner=runner or sandbox_runner(),
    )


def test_every_scenario_has_its_histories() -> None:
    names = {path.stem for path in RECORDED}
    for order_id in SCENARIOS:
        assert order_workflow_id(order_id) in names
        assert f"{order_workflow_id(order_id)}-shipping-1" in names


@pytest.mark.parametrize(
    "path", RECORDED, ids=[str(path.relative_to(HISTORIES).with_suffix("")) for path in RECORDED]
)
async def test_recorded_history_replays(path: Path) -> None:
    history = load(path)
    assert history.events[-1].event_type in CLOSED, "a whole history, from start to close"

    result = await replayer(OrderWorkflow, ShippingWorkflow).replay_workflow(history)

    assert result.replay_failure is None


@workflow.defn(name=ORDER_WORKFLOW)
class ValidatesFirst(OrderWorkflow):
    """OrderWorkflow with two steps swapped: the kind of change replay must catch."""

    @workflow.run
    async def run(self, start: OrderWorkflowInput) -> OrderStatus:
        return await super().run(start)

    async def _lifecycle(self) -> None:
        await self._step(Step.VALIDATE, OrderActivities.validate_order_step, self._order.order_id)
        await super()._lifecycle()


async def test_replay_catches_a_changed_workflow() -> None:
    # unsandboxed: the sandbox would re-import this test module, which is not workflow code
    changed = replayer(ValidatesFirst, ShippingWorkflow, runner=UnsandboxedWorkflowRunner())
    result = await changed.replay_workflow(
        load(HISTORIES / "order-replay-happy-path.json"), raise_on_replay_failure=False
    )
    # a replayed local activity gets the result its marker recorded, by sequence number: here a
    # step gets another step's result and fails on it, before Core reports the mismatch itself
    assert result.replay_failure is not None

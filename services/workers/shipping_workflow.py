"""ShippingWorkflow (task queue `shipping-tq`): prepare the package, then dispatch it to the carrier.

A child of OrderWorkflow, which owns the order's status and the numbering of its events. The
shipment signals `PackagePrepared` as soon as the package is ready, and returns the dispatch (the
tracking number and the address the carrier was given). When dispatch keeps failing it signals
the parent `DispatchFailed(reason)` and ends; the parent decides whether to ship again.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from services.workers.attempts import AttemptLog
    from services.workers.boundary import (
        CarrierDispatched,
        DispatchCarrierInput,
        DispatchFailed,
        DispatchResult,
        OrderActivities,
        PackagePrepared,
        PreparePackageInput,
        ShippingInput,
        ShippingResult,
    )
    from services.workers.steps import (
        StepActivity,
        StepExhausted,
        StepPolicy,
        run_step,
    )
    from shared.contracts import Address, Step
    from shared.lifecycle import SHIPPING_WORKFLOW, Signals

InputT = TypeVar("InputT", bound=BaseModel)
ResultT = TypeVar("ResultT")


@workflow.defn(name=SHIPPING_WORKFLOW)
class ShippingWorkflow:
    @workflow.init
    def __init__(self, shipment: ShippingInput) -> None:
        self._address = shipment.address
        self._attempts = AttemptLog(shipment.order_id)

    @workflow.run
    async def run(self, shipment: ShippingInput) -> ShippingResult:
        parent = workflow.get_external_workflow_handle(shipment.parent_workflow_id)
        policy = StepPolicy.of(shipment.policy, shipment.deadline)

        if not shipment.package_ready:
            prepare = PreparePackageInput(order_id=shipment.order_id)
            await self._step(Step.PREPARE_PACKAGE, OrderActivities.prepare_package_step, prepare, policy)
            # awaited: the parent has it before this shipment's result or failure
            await parent.signal(
                Signals.PACKAGE_PREPARED, PackagePrepared(prepare=self._attempts.report(Step.PREPARE_PACKAGE))
            )

        dispatch_policy = StepPolicy.of(
            shipment.policy, shipment.deadline, max_attempts=shipment.policy.dispatch_attempts_per_shipment
        )
        try:
            dispatched, address = await self._dispatch(shipment.order_id, dispatch_policy)
        except StepExhausted as exhausted:
            failed = DispatchFailed(
                reason=str(exhausted), dispatch=self._attempts.report(Step.DISPATCH_CARRIER)
            )
            await parent.signal(Signals.DISPATCH_FAILED, failed)
            return ShippingResult()
        return ShippingResult(
            dispatched=CarrierDispatched(
                tracking_number=dispatched.tracking_number,
                address=address,
                dispatch=self._attempts.report(Step.DISPATCH_CARRIER),
            )
        )

    @workflow.signal(name=Signals.UPDATE_ADDRESS)
    def update_address(self, address: Address) -> None:
        self._address = address

    async def _dispatch(self, order_id: str, policy: StepPolicy) -> tuple[DispatchResult, Address]:
        """Dispatch to the current address; if it changes mid-dispatch, dispatch to the new one.
        Returns the carrier's answer and the address it was given."""
        while True:
            address = self._address
            dispatch = asyncio.create_task(
                self._step(
                    Step.DISPATCH_CARRIER,
                    OrderActivities.dispatch_carrier_step,
                    DispatchCarrierInput(order_id=order_id, address=address),
                    policy,
                )
            )
            try:
                # evaluated only while awaited here, so on this round's dispatch and address
                await workflow.wait_condition(lambda: dispatch.done() or self._address != address)  # noqa: B023
                if dispatch.done():
                    return dispatch.result(), address
            finally:
                # stops the attempts for the old address, or all of them when shipping is cancelled
                dispatch.cancel()
            workflow.logger.info(
                "address changed during dispatch; dispatching to the new one",
                extra={"order_id": order_id, "step": Step.DISPATCH_CARRIER.value},
            )

    async def _step(
        self, step: Step, activity: StepActivity[InputT, ResultT], arg: InputT, policy: StepPolicy
    ) -> ResultT:
        return await run_step(step, activity, arg, policy=policy, attempts=self._attempts)

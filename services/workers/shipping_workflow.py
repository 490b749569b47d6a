"""ShippingWorkflow (task queue `shipping-tq`), a child of OrderWorkflow: prepare the package (signal
`PACKAGE_PREPARED`), then dispatch it and return the dispatch, or signal `DispatchFailed` and end."""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from services.workers.activity_interface import DispatchCarrierInput, OrderActivities
    from services.workers.shipment import CarrierDispatched, DispatchFailed, ShippingInput
    from services.workers.steps import STEP_EXHAUSTED, AttemptLog, run_step
    from shared.contracts import Address, Step
    from shared.lifecycle import SHIPPING_WORKFLOW, Signals


@workflow.defn(name=SHIPPING_WORKFLOW)
class ShippingWorkflow:
    @workflow.init
    def __init__(self, shipment: ShippingInput) -> None:
        self._shipment = shipment
        self._address = shipment.address
        self._attempts = AttemptLog(shipment.order_id)

    @workflow.run
    async def run(self, shipment: ShippingInput) -> CarrierDispatched | None:
        """The dispatch; None if it failed (and `DispatchFailed` told the parent why)."""
        parent = workflow.get_external_workflow_handle(shipment.parent_workflow_id)
        if not shipment.package_ready:
            await run_step(
                Step.PREPARE_PACKAGE,
                OrderActivities.prepare_package_step,
                shipment.order_id,
                policy=shipment.policy,
                deadline=shipment.deadline,
                attempts=self._attempts,
            )
            # awaited: the parent has it before this shipment's result or failure
            await parent.signal(Signals.PACKAGE_PREPARED, self._attempts.report(Step.PREPARE_PACKAGE))
        try:
            tracking_number, address = await self._dispatch()
        except ApplicationError as err:
            if err.type != STEP_EXHAUSTED:
                raise
            failed = DispatchFailed(reason=err.message, dispatch=self._attempts.report(Step.DISPATCH_CARRIER))
            await parent.signal(Signals.DISPATCH_FAILED, failed)
            return None
        dispatch = self._attempts.report(Step.DISPATCH_CARRIER)
        return CarrierDispatched(tracking_number=tracking_number, address=address, dispatch=dispatch)

    @workflow.signal(name=Signals.UPDATE_ADDRESS)
    def update_address(self, address: Address) -> None:
        self._address = address

    async def _dispatch(self) -> tuple[str, Address]:
        """The tracking number and the address the carrier got: the current one, even if it changed."""
        shipment = self._shipment
        while True:
            address = self._address
            dispatch = asyncio.create_task(
                run_step(
                    Step.DISPATCH_CARRIER,
                    OrderActivities.dispatch_carrier_step,
                    DispatchCarrierInput(order_id=shipment.order_id, address=address),
                    policy=shipment.policy,
                    deadline=shipment.deadline,
                    attempts=self._attempts,
                    max_attempts=shipment.policy.dispatch_attempts_per_shipment,
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
                extra={"order_id": shipment.order_id, "step": Step.DISPATCH_CARRIER.value},
            )

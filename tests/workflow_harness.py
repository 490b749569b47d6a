"""Run the real OrderWorkflow and ShippingWorkflow against scripted activity mocks.

`MockActivities` implements `OrderActivities` (so the mocks run under the real names); every mock
records its inputs and plays a script of behaviours (pass, fail, hang, wait for a gate, ...), and
the `publish_events` mock keeps every event the workflow published. `OrderHarness` runs workers
built as in production (`services.workers.worker`) on fresh order and shipping task queues, starts
one order and steers it with the same signals the bridge sends; a test may stop a worker for a
while to make things arrive together.

The `*_scenario` functions at the end are shared by the workflow tests and by
`record_histories.py`, which records the histories that `test_replay.py` replays.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

from temporalio import activity
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistory,
)
from temporalio.common import TypedSearchAttributes
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from payload_keys import TEST_DATA_CONVERTER
from services.workers import activity_interface
from services.workers.activity_interface import ChargeOutcome, OrderActivities, PaymentInput
from services.workers.steps import DEPENDENCY_UNAVAILABLE
from services.workers.worker import order_worker, shipping_worker
from shared import contracts
from shared.contracts import (
    Actor,
    Address,
    ApproveOrder,
    ApproveOrderPayload,
    CancelOrder,
    CancelOrderPayload,
    EventType,
    OrderEvent,
    OrderItem,
    OrderStatus,
    PlaceOrder,
    UpdateAddress,
    UpdateAddressPayload,
)
from shared.lifecycle import (
    ORDER_WORKFLOW,
    STATUS_QUERY,
    WORKFLOW_TASK_TIMEOUT,
    EarlyCommand,
    LifecyclePolicy,
    OrderWorkflowInput,
    Signals,
    order_summary,
    order_workflow_id,
)
from shared.settings import Settings
from testsupport import orders
from testsupport.orders import unique_id
from testsupport.polling import eventually
from testsupport.temporal import register_search_attributes

T = TypeVar("T")

TRACKING_NUMBER = "TRK-TEST-0001"
ADDRESS = Address.model_validate(orders.ADDRESS)
NEW_ADDRESS = Address.model_validate(orders.NEW_ADDRESS)
ITEMS = [
    OrderItem(sku="SKU-1", qty=2, unit_price_cents=1_250),
    OrderItem(sku="SKU-2", qty=1, unit_price_cents=500),
]
AMOUNT_CENTS = 3_000
# who issues the commands, as the bridge verified them: the placer, a reviewer, an operator
CUSTOMER = Actor(subject="customer-1", roles=frozenset({contracts.Role.CUSTOMER}))
CUSTOMER_WHO_REVIEWS = Actor(
    subject=CUSTOMER.subject, roles=frozenset({contracts.Role.CUSTOMER, contracts.Role.REVIEWER})
)
OTHER_CUSTOMER = Actor(subject="customer-2", roles=frozenset({contracts.Role.CUSTOMER}))
REVIEWER = Actor(subject="reviewer-1", roles=frozenset({contracts.Role.REVIEWER}))
OPERATOR = Actor(subject="operator-1", roles=frozenset({contracts.Role.OPERATOR}))

# Small numbers so every path ends quickly; time skipping makes the timers instant anyway. One
# attempt at a time keeps each mock's script in step with the attempt numbers; the production
# settings fill in anything not named here.
TEST_POLICY: dict[str, Any] = {
    "review_window_seconds": 5.0,
    "review_slot_grace_seconds": 0.0,  # every review gives the slot back: that path is recorded
    "lifecycle_deadline_seconds": 14.0,
    "max_shipping_attempts": 3,
    "activity_attempt_timeout_seconds": 0.5,
    "parallel_attempts": 1,
    "dispatch_attempts_per_shipment": 2,
}
# Production's attempts (3 in flight, 0.3 s each), for the tests and recordings that need losers.
PRODUCTION_ATTEMPTS: dict[str, Any] = {
    "activity_attempt_timeout_seconds": 0.3,
    "parallel_attempts": 3,
    "dispatch_attempts_per_shipment": 12,
}

# Real seconds a test waits for something the workflow should do promptly.
PROMPTLY = 10.0
# Real seconds a lifecycle may take to end once the test awaits its result (time skips meanwhile).
LIFECYCLE_BOUND = 30.0


# --- behaviours a mock can be told to play --------------------------------------------------------
Behaviour = Callable[[], Awaitable[None]]


async def passes() -> None:
    return None


def fails(message: str = "mock failure") -> Behaviour:
    async def behaviour() -> None:
        raise ApplicationError(message)  # retryable, like flaky_call's RuntimeError

    return behaviour


def invalid(message: str = "mock rule broken") -> Behaviour:
    async def behaviour() -> None:
        raise ApplicationError(message, type=activity_interface.ORDER_INVALID, non_retryable=True)

    return behaviour


async def database_down() -> None:
    """How an attempt fails while the database is unreachable (see `activities._step_failures`)."""
    raise ApplicationError("ConnectionRefusedError: connection refused", type=DEPENDENCY_UNAVAILABLE)


async def hangs() -> None:
    """Never returns on its own: the attempt's start-to-close timeout ends it."""
    await asyncio.Event().wait()


def flaky(seed: int) -> Behaviour:
    """Like the contract's fault injector (a third fail, a third hang, a third pass), but from a
    seeded generator, so a recording can be made again."""
    draw = random.Random(seed).random

    async def behaviour() -> None:
        r = draw()
        if r < 0.33:
            raise ApplicationError("Forced failure for testing")
        if r < 0.67:
            await hangs()

    return behaviour


def waits_for(gate: asyncio.Event, then: Behaviour = passes) -> Behaviour:
    """Holds the attempt until the test opens the gate (attempts time out meanwhile), then plays
    `then`."""

    async def behaviour() -> None:
        await gate.wait()
        await then()

    return behaviour


# --- the mocks ------------------------------------------------------------------------------------
Mocked = Callable[..., Awaitable[Any]]
"""An activity of `OrderActivities`, e.g. `OrderActivities.dispatch_carrier`: names a mock."""


BUSINESS_STEPS = frozenset(
    {
        "receive_order",
        "validate_order",
        "charge_payment",
        "prepare_package",
        "dispatch_carrier",
        "mark_shipped",
    }
)
"""The activities that call the fault injector in production."""


class MockActivities(OrderActivities):
    """One mock per activity: records each input, then plays the next scripted behaviour and
    returns what the real activity would.

    Unscripted, a business step plays `steps_otherwise`, the other activities pass."""

    def __init__(self, steps_otherwise: Behaviour = passes) -> None:
        self.calls: dict[str, list[Any]] = defaultdict(list)
        self.events: list[OrderEvent] = []
        self.conflicting: list[tuple[OrderEvent, OrderEvent]] = []
        """Events published again under the same id with other content: never allowed."""
        self._scripts: dict[str, deque[Behaviour]] = defaultdict(deque)
        self._otherwise: dict[str, Behaviour] = dict.fromkeys(BUSINESS_STEPS, steps_otherwise)
        self.no_slot_answers = 0
        """How many of the next asks for a slot after the review find none free."""

    def script(self, mocked: Mocked, *first: Behaviour, then: Behaviour | None = None) -> None:
        """The next calls of `mocked` play `first` in order, every later call plays `then` (by
        default what it played unscripted)."""
        self._scripts[mocked.__name__] = deque(first)
        if then is not None:
            self._otherwise[mocked.__name__] = then

    def called(self, mocked: Mocked) -> list[Any]:
        return self.calls[mocked.__name__]

    def event_types(self) -> list[EventType]:
        return [event.type for event in self.events]

    def events_of(self, event_type: EventType) -> list[OrderEvent]:
        return [event for event in self.events if event.type is event_type]

    async def _play(self, name: str, input: object, result: T) -> T:
        self.calls[name].append(input)
        script = self._scripts[name]
        behaviour = script.popleft() if script else self._otherwise.get(name, passes)
        await behaviour()
        return result

    async def receive_order(self, order: PlaceOrder) -> None:
        return await self._play("receive_order", order, None)

    async def validate_order(self, order_id: str) -> None:
        return await self._play("validate_order", order_id, None)

    async def charge_payment(self, payment: PaymentInput) -> ChargeOutcome:
        return await self._play("charge_payment", payment, ChargeOutcome.CHARGED)

    async def prepare_package(self, order_id: str) -> None:
        return await self._play("prepare_package", order_id, None)

    async def dispatch_carrier(self, dispatch: activity_interface.DispatchCarrierInput) -> str:
        return await self._play("dispatch_carrier", dispatch, TRACKING_NUMBER)

    async def mark_shipped(self, order_id: str) -> None:
        return await self._play("mark_shipped", order_id, None)

    @activity.defn
    async def refund_payment(self, payment: PaymentInput) -> bool:
        # as the business function: a payment no charge attempt reached is voided, not refunded
        return await self._play("refund_payment", payment, bool(self.calls["charge_payment"]))

    @activity.defn
    async def publish_events(self, events: list[OrderEvent]) -> None:
        await self._play("publish_events", events, None)
        # at least once: a workflow task retried (a signal landed as it completed, say) runs its
        # local activities again, and a republished event must be the same event
        seen = {event.event_id: event for event in self.events}
        for event in events:
            if event.event_id not in seen:
                self.events.append(event)
            elif seen[event.event_id] != event:
                self.conflicting.append((seen[event.event_id], event))

    @activity.defn
    async def leave_admission_for_review(self, order_id: str) -> None:
        return await self._play("leave_admission_for_review", order_id, None)

    @activity.defn
    async def resume_admission(self, order_id: str) -> bool:
        await self._play("resume_admission", order_id, None)
        if self.no_slot_answers:
            self.no_slot_answers -= 1
            return False
        return True

    @activity.defn
    async def release_admission(self, order_id: str) -> None:
        return await self._play("release_admission", order_id, None)


# --- commands -------------------------------------------------------------------------------------
def place_order(order_id: str | None = None) -> PlaceOrder:
    """The harness's order (its items, by `CUSTOMER`), placed as `testsupport` places one."""
    return orders.place_order(order_id or unique_id("wf"), issued_by=CUSTOMER, items=ITEMS, address=ADDRESS)


def policy_for(shipping_queue: str) -> LifecyclePolicy:
    defaults = Settings(_env_file=None).lifecycle_policy()
    return defaults.model_copy(update={**TEST_POLICY, "shipping_task_queue": shipping_queue})


# --- the harness ----------------------------------------------------------------------------------
class Role(StrEnum):
    """What a worker polls for: a workflow's local activities run in the worker of its queue."""

    ORDERS = "orders"  # the order task queue: OrderWorkflow and its activities
    SHIPMENTS = "shipments"  # the shipping task queue: ShippingWorkflow and its activities


async def wait_until(check: Callable[[], bool], what: str, timeout: float = PROMPTLY) -> None:
    """`eventually` for a check of what the mocks saw; fails the test naming `what`."""

    async def holds() -> bool:
        return check()

    await eventually(holds, timeout, what)


class OrderHarness:
    """One order's lifecycle on fresh task queues, with its commands and what the mocks saw."""

    def __init__(
        self,
        client: Client,
        mocks: MockActivities,
        order_id: str | None,
        sticky: bool,
        policy: dict[str, Any],
    ) -> None:
        self.client = client
        self.mocks = mocks
        self.sticky = sticky
        self.order = place_order(order_id)
        suffix = uuid4().hex[:8]  # fresh task queues: no other test's worker takes this one's tasks
        self.order_queue, self.shipping_queue = f"order-tq-{suffix}", f"shipping-tq-{suffix}"
        self.policy = policy_for(self.shipping_queue).model_copy(update=policy)
        self._handle: WorkflowHandle[Any, OrderStatus] | None = None
        self._workers: dict[Role, tuple[Worker, asyncio.Task[None]]] = {}

    @property
    def order_id(self) -> str:
        return self.order.order_id

    @property
    def workflow_id(self) -> str:
        return order_workflow_id(self.order_id)

    @property
    def payment(self) -> PaymentInput:
        """The order's payment, as the charge and the refund get it."""
        payload = self.order.payload
        return PaymentInput(
            order_id=self.order_id, payment_id=payload.payment_id, amount_cents=payload.amount_cents
        )

    def shipment_id(self, attempt: int) -> str:
        return f"{self.workflow_id}-shipping-{attempt}"

    @property
    def handle(self) -> WorkflowHandle[Any, OrderStatus]:
        assert self._handle is not None, "start() the lifecycle first"
        return self._handle

    async def start(
        self,
        *,
        queued_at: datetime | None = None,
        first_seq: int = 1,
        early_commands: list[EarlyCommand] | None = None,
        **policy: Any,
    ) -> WorkflowHandle[Any, OrderStatus]:
        """Start the lifecycle as the bridge does; `policy` overrides the test policy's fields."""
        if policy:
            self.policy = self.policy.model_copy(update=policy)
        start = OrderWorkflowInput(
            order=self.order,
            policy=self.policy,
            queued_at=queued_at,
            first_seq=first_seq,
            early_commands=early_commands or [],
        )
        self._handle = await self.client.start_workflow(
            ORDER_WORKFLOW,
            start,
            id=self.workflow_id,
            task_queue=self.order_queue,
            task_timeout=WORKFLOW_TASK_TIMEOUT,
            result_type=OrderStatus,
            static_summary=order_summary(self.order),
        )
        return self._handle

    # commands, as the bridge sends them: with the issuer it verified
    def approval(self, command_id: UUID | None = None, by: Actor = REVIEWER) -> ApproveOrder:
        return ApproveOrder(
            command_id=command_id or uuid4(),
            order_id=self.order_id,
            issued_at=datetime.now(UTC),
            issued_by=by,
            payload=ApproveOrderPayload(note="looks fine"),
        )

    def address_update(
        self, address: Address, command_id: UUID | None = None, by: Actor = CUSTOMER
    ) -> UpdateAddress:
        return UpdateAddress(
            command_id=command_id or uuid4(),
            order_id=self.order_id,
            issued_at=datetime.now(UTC),
            issued_by=by,
            payload=UpdateAddressPayload(address=address),
        )

    async def approve(self, command_id: UUID | None = None, by: Actor = REVIEWER) -> ApproveOrder:
        command = self.approval(command_id, by)
        await self.handle.signal(Signals.APPROVE, command)
        return command

    async def cancel(
        self,
        reason: str | None = "customer changed their mind",
        command_id: UUID | None = None,
        by: Actor = CUSTOMER,
    ) -> CancelOrder:
        command = CancelOrder(
            command_id=command_id or uuid4(),
            order_id=self.order_id,
            issued_at=datetime.now(UTC),
            issued_by=by,
            payload=CancelOrderPayload(reason=reason),
        )
        await self.handle.signal(Signals.CANCEL, command)
        return command

    async def update_address(
        self, address: Address, command_id: UUID | None = None, by: Actor = CUSTOMER
    ) -> UpdateAddress:
        command = self.address_update(address, command_id, by)
        await self.handle.signal(Signals.UPDATE_ADDRESS, command)
        return command

    async def start_in_review(self, **policy: Any) -> None:
        """Start the lifecycle (`policy` as for `start`) and wait until the order is in review."""
        await self.start(**policy)
        await self.wait_for_event(EventType.AWAITING_APPROVAL)

    async def start_and_approve(self, **policy: Any) -> ApproveOrder:
        """Start the lifecycle (`policy` as for `start`) and approve the order once it is in review."""
        await self.start_in_review(**policy)
        return await self.approve()

    # observations
    async def status(self) -> OrderStatus:
        status: OrderStatus = await self.handle.query(STATUS_QUERY, result_type=OrderStatus)
        return status

    async def search_attributes(self) -> TypedSearchAttributes:
        return (await self.handle.describe()).typed_search_attributes

    async def wait_for_event(self, event_type: EventType, timeout: float = PROMPTLY) -> OrderEvent:
        what = f"a {event_type.value} event"
        await wait_until(lambda: bool(self.mocks.events_of(event_type)), what, timeout)
        return self.mocks.events_of(event_type)[0]

    async def wait_for_call(self, mocked: Mocked, count: int = 1) -> None:
        what = f"{count} call(s) of {mocked.__name__}"
        await wait_until(lambda: len(self.mocks.called(mocked)) >= count, what)

    async def result(self) -> OrderStatus:
        """The lifecycle's final status; time skips while this waits. Fails if it never ends."""
        try:
            return await asyncio.wait_for(self.handle.result(), LIFECYCLE_BOUND)
        except WorkflowFailureError as err:
            # the lifecycle reports its own failures in its status: the workflow itself must not fail
            raise AssertionError(f"the order workflow itself failed: {err.cause}") from err
        except TimeoutError:
            raise AssertionError(
                f"the lifecycle did not end within {LIFECYCLE_BOUND} real seconds; "
                f"events so far: {[e.value for e in self.mocks.event_types()]}"
            ) from None

    async def shipment_status(self, attempt: int) -> WorkflowExecutionStatus | None:
        """How the shipping child of that attempt stands; None if it was never started."""
        try:
            description = await self.client.get_workflow_handle(self.shipment_id(attempt)).describe()
        except RPCError as err:
            if err.status is RPCStatusCode.NOT_FOUND:
                return None
            raise
        return description.status

    async def wait_for_shipment(self, attempt: int, status: WorkflowExecutionStatus) -> None:
        async def reached() -> bool:
            return await self.shipment_status(attempt) is status

        await eventually(reached, PROMPTLY, f"shipment {attempt} to be {status.name}")

    async def wait_for_shipment_history(self, attempt: int, *wanted: HistoryEventType.ValueType) -> None:
        """Until the shipment's history holds an event of each `wanted` type."""

        async def recorded() -> bool:
            history = await self.client.get_workflow_handle(self.shipment_id(attempt)).fetch_history()
            return set(wanted) <= {event.event_type for event in history.events}

        names = [HistoryEventType.Name(event_type) for event_type in wanted]
        await eventually(recorded, PROMPTLY, f"shipment {attempt} to record {names}")

    async def histories(self) -> dict[str, WorkflowHistory]:
        """The order's history and each of its shipments', by workflow id."""
        workflow_ids = [self.workflow_id]
        attempt = 1
        while await self.shipment_status(attempt) is not None:
            workflow_ids.append(self.shipment_id(attempt))
            attempt += 1
        return {wid: await self.client.get_workflow_handle(wid).fetch_history() for wid in workflow_ids}

    # workers
    def start_worker(self, role: Role) -> None:
        """Poll for `role` (a new worker each time: a worker runs once)."""
        build, queue = {
            Role.ORDERS: (order_worker, self.order_queue),
            Role.SHIPMENTS: (shipping_worker, self.shipping_queue),
        }[role]
        # without a cache a workflow's tasks go to the shared queue, each replaying the history
        worker = build(self.client, queue, self.mocks, max_cached_workflows=1000 if self.sticky else 0)
        self._workers[role] = (worker, asyncio.create_task(worker.run()))

    async def stop_worker(self, role: Role) -> None:
        if role not in self._workers:
            return
        worker, running = self._workers.pop(role)
        await worker.shutdown()
        await running

    @asynccontextmanager
    async def worker_stopped(self, role: Role) -> AsyncIterator[None]:
        """No worker for `role` inside the block: what happens meanwhile waits in the histories.

        Needs a harness that is not `sticky`: a cached workflow's next task would wait for the
        stopped worker's own queue."""
        assert not self.sticky, "order_harness(..., sticky=False) to stop a worker"
        await self.stop_worker(role)
        try:
            yield
        finally:
            self.start_worker(role)

    async def stop_if_running(self) -> None:
        """Terminate a lifecycle a failing test left behind (its child goes with it)."""
        if self._handle is None:
            return
        description = await self._handle.describe()
        if description.status == WorkflowExecutionStatus.RUNNING:
            await self._handle.terminate("test over")


@asynccontextmanager
async def own_time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping test server of one's own (the binary the test extras install, if there)."""
    binary = shutil.which("temporal-test-server", path=str(Path(sys.executable).parent))
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=TEST_DATA_CONVERTER, test_server_existing_path=binary
    )
    try:
        await register_search_attributes(env.client)
        yield env
    finally:
        await env.shutdown()


@asynccontextmanager
async def order_harness(
    client: Client,
    *,
    order_id: str | None = None,
    sticky: bool = True,
    unscripted: Behaviour = passes,
    policy: dict[str, Any] | None = None,
) -> AsyncIterator[OrderHarness]:
    """Workers for both task queues (fresh names) with the mocks, and a harness for one order.
    `unscripted` is what a business step's mock plays when its script does not say; `policy`
    overrides fields of the test policy."""
    harness = OrderHarness(client, MockActivities(unscripted), order_id, sticky, policy or {})
    for role in Role:
        harness.start_worker(role)
    try:
        yield harness
    finally:
        await harness.stop_if_running()
        for role in Role:
            await harness.stop_worker(role)


# --- scenarios shared with record_histories.py ----------------------------------------------------
async def happy_path_scenario(harness: OrderHarness) -> tuple[OrderStatus, ApproveOrder]:
    approval = await harness.start_and_approve()
    return await harness.result(), approval


async def cancel_after_payment_scenario(harness: OrderHarness) -> tuple[OrderStatus, CancelOrder]:
    """Dispatch hangs, so the order is paid and its shipment running when the cancel arrives."""
    harness.mocks.script(OrderActivities.dispatch_carrier, then=hangs)
    # still dispatching when the cancel lands
    await harness.start_and_approve(dispatch_attempts_per_shipment=20)
    await harness.wait_for_call(OrderActivities.dispatch_carrier)
    cancel = await harness.cancel()
    return await harness.result(), cancel


async def early_commands_scenario(harness: OrderHarness) -> tuple[OrderStatus, list[EarlyCommand]]:
    """Started as the bridge starts an order that waited for a slot: after its `queued` event
    (seq 1), with the approval and an address change that arrived meanwhile."""
    early: list[EarlyCommand] = [harness.approval(), harness.address_update(NEW_ADDRESS)]
    queued_at = datetime.now(UTC) - timedelta(seconds=1.5)
    await harness.start(queued_at=queued_at, first_seq=2, early_commands=early)
    return await harness.result(), early


async def dispatch_retry_scenario(harness: OrderHarness) -> OrderStatus:
    """The first shipment's dispatch fails every attempt it has; the second shipment's passes."""
    per_shipment = harness.policy.dispatch_attempts_per_shipment
    refusals = [fails(f"carrier refused #{n}") for n in range(1, per_shipment + 1)]
    harness.mocks.script(OrderActivities.dispatch_carrier, *refusals)
    await harness.start_and_approve()
    return await harness.result()


async def temporal_cancel_scenario(harness: OrderHarness) -> OrderStatus:
    """An operator cancels the workflow through Temporal while its paid order's shipment dispatches."""
    harness.mocks.script(OrderActivities.dispatch_carrier, then=hangs)
    await harness.start_and_approve(dispatch_attempts_per_shipment=20)
    await harness.wait_for_call(OrderActivities.dispatch_carrier)
    await harness.handle.cancel()
    with suppress(WorkflowFailureError):  # it closes as Canceled
        await asyncio.wait_for(harness.handle.result(), LIFECYCLE_BOUND)
    return await harness.status()


async def deadline_scenario(harness: OrderHarness) -> OrderStatus:
    """Dispatch never succeeds: the lifecycle's deadline fails the order during its shipment."""
    harness.mocks.script(OrderActivities.dispatch_carrier, then=hangs)
    await harness.start_and_approve(
        lifecycle_deadline_seconds=5.0, review_window_seconds=2.0, dispatch_attempts_per_shipment=50
    )
    return await harness.result()

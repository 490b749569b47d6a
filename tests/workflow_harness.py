"""Run the real OrderWorkflow and ShippingWorkflow against scripted activity mocks.

`MockActivities` registers one mock under each real activity name (`Activities.*`); every mock
records its calls and plays a script of behaviours (pass, fail, hang, wait for a gate, ...), and
the `publish_events` mock keeps every event the workflow published. `OrderHarness` runs workers on
fresh order and shipping task queues with the production sandbox runner and interceptor, starts one
order and steers it with the same signals the bridge sends; a test may stop a worker for a while
to make things arrive together.

The three `*_scenario` functions at the end are shared by the workflow tests and by
`record_histories.py`, which records the histories that `test_replay.py` replays.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from temporalio import activity
from temporalio.api.enums.v1 import EventType as HistoryEventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from services.workers.interceptors import AttemptDeadlineInterceptor
from services.workers.order_workflow import OrderWorkflow
from services.workers.shipping_workflow import ShippingWorkflow
from services.workers.steps import (
    ORDER_INVALID,
    Activities,
    ChargeRequest,
    ChargeResult,
    DispatchRequest,
    DispatchResult,
)
from services.workers.worker import sandbox_runner
from shared.contracts import (
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
    PlaceOrderPayload,
    UpdateAddress,
    UpdateAddressPayload,
)
from shared.lifecycle import (
    ORDER_WORKFLOW,
    STATUS_QUERY,
    LifecyclePolicy,
    OrderWorkflowInput,
    Signals,
    order_workflow_id,
)
from shared.settings import Settings

TRACKING_NUMBER = "TRK-TEST-0001"
ADDRESS = Address(
    name="Ada Lovelace", line1="1 Analytical St", city="London", postal_code="N1 1AA", country="GB"
)
NEW_ADDRESS = Address(
    name="Ada Lovelace", line1="2 Difference Rd", city="Leeds", postal_code="LS1 1AA", country="GB"
)
ITEMS = [
    OrderItem(sku="SKU-1", qty=2, unit_price_cents=1_250),
    OrderItem(sku="SKU-2", qty=1, unit_price_cents=500),
]
AMOUNT_CENTS = 3_000

# Small numbers so every path ends quickly; time skipping makes the timers instant anyway. One
# attempt at a time keeps each mock's script in step with the attempt numbers; the production
# settings fill in anything not named here.
TEST_POLICY: dict[str, Any] = dict(
    review_window_seconds=5.0,
    lifecycle_deadline_seconds=14.0,
    max_shipping_attempts=3,
    activity_attempt_timeout_seconds=0.5,
    parallel_attempts=1,
    dispatch_attempts_per_shipment=2,
)

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
        raise ApplicationError(message, type=ORDER_INVALID, non_retryable=True)

    return behaviour


async def hangs() -> None:
    """Never returns on its own: the attempt's start-to-close timeout ends it."""
    await asyncio.Event().wait()


def waits_for(gate: asyncio.Event, then: Behaviour = passes) -> Behaviour:
    """Holds the attempt until the test opens the gate (attempts time out meanwhile), then plays
    `then`."""

    async def behaviour() -> None:
        await gate.wait()
        await then()

    return behaviour


# --- the mocks ------------------------------------------------------------------------------------
class MockActivities:
    """One mock per activity name: records each call, then plays the next scripted behaviour."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = defaultdict(list)
        self.events: list[OrderEvent] = []
        self._scripts: dict[str, deque[Behaviour]] = defaultdict(deque)
        self._otherwise: dict[str, Behaviour] = {}

    def script(self, name: str, *first: Behaviour, then: Behaviour = passes) -> None:
        """The next calls of `name` play `first` in order, every later call plays `then`."""
        self._scripts[name] = deque(first)
        self._otherwise[name] = then

    def called(self, name: str) -> list[Any]:
        return self.calls[name]

    def event_types(self) -> list[EventType]:
        return [event.type for event in self.events]

    def events_of(self, event_type: EventType) -> list[OrderEvent]:
        return [event for event in self.events if event.type is event_type]

    async def _play(self, name: str, arg: Any) -> None:
        self.calls[name].append(arg)
        script = self._scripts[name]
        behaviour = script.popleft() if script else self._otherwise.get(name, passes)
        await behaviour()

    @activity.defn(name=Activities.RECEIVE_ORDER)
    async def receive_order(self, order: PlaceOrder) -> None:
        await self._play(Activities.RECEIVE_ORDER, order)

    @activity.defn(name=Activities.VALIDATE_ORDER)
    async def validate_order(self, order_id: str) -> None:
        await self._play(Activities.VALIDATE_ORDER, order_id)

    @activity.defn(name=Activities.CHARGE_PAYMENT)
    async def charge_payment(self, request: ChargeRequest) -> ChargeResult:
        await self._play(Activities.CHARGE_PAYMENT, request)
        return ChargeResult(already_charged=False)

    @activity.defn(name=Activities.PREPARE_PACKAGE)
    async def prepare_package(self, order_id: str) -> None:
        await self._play(Activities.PREPARE_PACKAGE, order_id)

    @activity.defn(name=Activities.DISPATCH_CARRIER)
    async def dispatch_carrier(self, request: DispatchRequest) -> DispatchResult:
        await self._play(Activities.DISPATCH_CARRIER, request)
        return DispatchResult(tracking_number=TRACKING_NUMBER)

    @activity.defn(name=Activities.MARK_SHIPPED)
    async def mark_shipped(self, order_id: str) -> None:
        await self._play(Activities.MARK_SHIPPED, order_id)

    @activity.defn(name=Activities.REFUND_PAYMENT)
    async def refund_payment(self, payment_id: str) -> bool:
        await self._play(Activities.REFUND_PAYMENT, payment_id)
        return True

    @activity.defn(name=Activities.PUBLISH_EVENTS)
    async def publish_events(self, events: list[OrderEvent]) -> None:
        await self._play(Activities.PUBLISH_EVENTS, events)
        self.events.extend(events)

    def order_queue_activities(self) -> list[Callable[..., Any]]:
        return [
            self.receive_order,
            self.validate_order,
            self.charge_payment,
            self.mark_shipped,
            self.refund_payment,
            self.publish_events,
        ]

    def shipping_queue_activities(self) -> list[Callable[..., Any]]:
        return [self.prepare_package, self.dispatch_carrier]


# --- commands -------------------------------------------------------------------------------------
def unique_order_id() -> str:
    return f"wf-{uuid4().hex[:12]}"


def place_order(order_id: str) -> PlaceOrder:
    return PlaceOrder(
        command_id=uuid4(),
        order_id=order_id,
        issued_at=datetime.now(UTC),
        correlation_id=f"corr-{order_id}",
        payload=PlaceOrderPayload(payment_id=f"pay-{order_id}", items=ITEMS, address=ADDRESS),
    )


def policy_for(shipping_queue: str) -> LifecyclePolicy:
    defaults = Settings(_env_file=None).lifecycle_policy()
    return defaults.model_copy(update={**TEST_POLICY, "shipping_task_queue": shipping_queue})


# --- the harness ----------------------------------------------------------------------------------
class Role(StrEnum):
    """What a worker polls for. The shipping queue's workflows and activities have a worker each,
    so a test can stop the shipments' workflow tasks while their activities go on."""

    ORDERS = "orders"  # the order task queue: OrderWorkflow and its activities
    SHIPMENTS = "shipments"  # the shipping task queue's ShippingWorkflow
    SHIPPING_ACTIVITIES = "shipping activities"  # the shipping task queue's activities


# as in production (services.workers.worker), with the mocks in place of the activities
WORKER_OPTIONS: dict[str, Any] = dict(
    workflow_runner=sandbox_runner(), interceptors=[AttemptDeadlineInterceptor()]
)


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = PROMPTLY
) -> None:
    """Poll `check` until it holds; fail the test with `what` if it does not within `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        holds = check()
        if holds if isinstance(holds, bool) else await holds:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class OrderHarness:
    """One order's lifecycle on fresh task queues, with its commands and what the mocks saw."""

    def __init__(
        self,
        client: Client,
        mocks: MockActivities,
        order_queue: str,
        shipping_queue: str,
        *,
        order_id: str | None = None,
        sticky: bool = True,
    ) -> None:
        self.client = client
        self.mocks = mocks
        self.order_queue = order_queue
        self.shipping_queue = shipping_queue
        self.sticky = sticky
        self.order = place_order(order_id or unique_order_id())
        self.policy = policy_for(shipping_queue)
        self._handle: WorkflowHandle[Any, OrderStatus] | None = None
        self._workers: dict[Role, tuple[Worker, asyncio.Task[None]]] = {}

    @property
    def order_id(self) -> str:
        return self.order.order_id

    @property
    def workflow_id(self) -> str:
        return order_workflow_id(self.order_id)

    def shipment_id(self, attempt: int) -> str:
        return f"{self.workflow_id}-shipping-{attempt}"

    @property
    def handle(self) -> WorkflowHandle[Any, OrderStatus]:
        assert self._handle is not None, "start() the lifecycle first"
        return self._handle

    async def start(self, **policy: Any) -> WorkflowHandle[Any, OrderStatus]:
        if policy:
            self.policy = self.policy.model_copy(update=policy)
        self._handle = await self.client.start_workflow(
            ORDER_WORKFLOW,
            OrderWorkflowInput(order=self.order, policy=self.policy),
            id=self.workflow_id,
            task_queue=self.order_queue,
            result_type=OrderStatus,
        )
        return self._handle

    # commands, as the bridge sends them
    async def approve(self, command_id: UUID | None = None) -> ApproveOrder:
        command = ApproveOrder(
            command_id=command_id or uuid4(),
            order_id=self.order_id,
            issued_at=datetime.now(UTC),
            payload=ApproveOrderPayload(reviewer="reviewer-1", note="looks fine"),
        )
        await self.handle.signal(Signals.APPROVE, command)
        return command

    async def cancel(self, reason: str | None = "customer changed their mind") -> CancelOrder:
        command = CancelOrder(
            command_id=uuid4(),
            order_id=self.order_id,
            issued_at=datetime.now(UTC),
            payload=CancelOrderPayload(reason=reason),
        )
        await self.handle.signal(Signals.CANCEL, command)
        return command

    async def update_address(self, address: Address, command_id: UUID | None = None) -> UpdateAddress:
        command = UpdateAddress(
            command_id=command_id or uuid4(),
            order_id=self.order_id,
            issued_at=datetime.now(UTC),
            payload=UpdateAddressPayload(address=address),
        )
        await self.handle.signal(Signals.UPDATE_ADDRESS, command)
        return command

    # observations
    async def status(self) -> OrderStatus:
        return await self.handle.query(STATUS_QUERY, result_type=OrderStatus)

    async def wait_for_event(self, event_type: EventType, timeout: float = PROMPTLY) -> OrderEvent:
        what = f"a {event_type.value} event"
        await wait_until(lambda: bool(self.mocks.events_of(event_type)), what, timeout)
        return self.mocks.events_of(event_type)[0]

    async def wait_for_call(self, name: str, count: int = 1) -> None:
        await wait_until(lambda: len(self.mocks.called(name)) >= count, f"{count} call(s) of {name}")

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

        await wait_until(reached, f"shipment {attempt} to be {status.name}")

    async def wait_for_shipment_history(self, attempt: int, *wanted: HistoryEventType) -> None:
        """Until the shipment's history holds an event of each `wanted` type."""

        async def recorded() -> bool:
            history = await self.client.get_workflow_handle(self.shipment_id(attempt)).fetch_history()
            return set(wanted) <= {event.event_type for event in history.events}

        names = [HistoryEventType.Name(event_type) for event_type in wanted]
        await wait_until(recorded, f"shipment {attempt} to record {names}")

    # workers
    def start_worker(self, role: Role) -> None:
        """Poll for `role` (a new worker each time: a worker runs once)."""
        queue, workflows, activities = {
            Role.ORDERS: (self.order_queue, [OrderWorkflow], self.mocks.order_queue_activities()),
            Role.SHIPMENTS: (self.shipping_queue, [ShippingWorkflow], []),
            Role.SHIPPING_ACTIVITIES: (self.shipping_queue, [], self.mocks.shipping_queue_activities()),
        }[role]
        worker = Worker(
            self.client,
            task_queue=queue,
            workflows=workflows,
            activities=activities,
            # without a cache a workflow's tasks go to the shared queue, each replaying the history
            max_cached_workflows=1000 if self.sticky else 0,
            **WORKER_OPTIONS,
        )
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
        data_converter=pydantic_data_converter, test_server_existing_path=binary
    )
    try:
        yield env
    finally:
        await env.shutdown()


@asynccontextmanager
async def order_harness(
    client: Client, *, order_id: str | None = None, sticky: bool = True
) -> AsyncIterator[OrderHarness]:
    """Workers for both task queues (fresh names) with the mocks, and a harness for one order."""
    mocks = MockActivities()
    suffix = uuid4().hex[:8]
    queues = f"order-tq-{suffix}", f"shipping-tq-{suffix}"
    harness = OrderHarness(client, mocks, *queues, order_id=order_id, sticky=sticky)
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
    await harness.start()
    await harness.wait_for_event(EventType.AWAITING_APPROVAL)
    approval = await harness.approve()
    return await harness.result(), approval


async def cancel_after_payment_scenario(harness: OrderHarness) -> tuple[OrderStatus, CancelOrder]:
    """Dispatch hangs, so the order is paid and its shipment running when the cancel arrives."""
    harness.mocks.script(Activities.DISPATCH_CARRIER, then=hangs)
    await harness.start()
    await harness.wait_for_event(EventType.AWAITING_APPROVAL)
    await harness.approve()
    await harness.wait_for_call(Activities.DISPATCH_CARRIER)
    cancel = await harness.cancel()
    return await harness.result(), cancel


async def dispatch_retry_scenario(harness: OrderHarness) -> OrderStatus:
    """The first shipment's dispatch fails every attempt it has; the second shipment's passes."""
    per_shipment = harness.policy.dispatch_attempts_per_shipment
    refusals = [fails(f"carrier refused #{n}") for n in range(1, per_shipment + 1)]
    harness.mocks.script(Activities.DISPATCH_CARRIER, *refusals)
    await harness.start()
    await harness.wait_for_event(EventType.AWAITING_APPROVAL)
    await harness.approve()
    return await harness.result()

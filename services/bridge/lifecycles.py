"""The bridge's side of Temporal: an admitted placement becomes a workflow start, any other command
a signal; both return the command's outcome and leave transient `RPCError`s to the caller."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowQueryFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from shared.authorization import FORBIDDEN
from shared.contracts import (
    ApproveOrder,
    CancelOrder,
    CommandType,
    OrderEvent,
    OrderStatus,
    PlaceOrder,
    UpdateAddress,
)
from shared.lifecycle import (
    EVENTS_QUERY,
    ORDER_WORKFLOW,
    WORKFLOW_TASK_TIMEOUT,
    EarlyCommand,
    OrderWorkflowInput,
    Signals,
    order_summary,
    order_workflow_id,
)
from shared.settings import Settings

SteeringCommand = ApproveOrder | CancelOrder | UpdateAddress

# the workflow's memo names the command that started it, so a redelivered PlaceOrder is recognised
PLACE_COMMAND_MEMO = "place_command_id"
QUEUED_SEQ = 1  # the bridge's `queued`: the lifecycle's events follow it

ORDER_EXISTS = "order already exists"
UNKNOWN_ORDER = "unknown order"
ORDER_ENDED = "order already ended"
APPLIED_BEFORE_THE_END = "taken by the lifecycle before it ended"
EVENTS_QUERY_TIMEOUT = timedelta(seconds=10)

SIGNAL_OF_COMMAND: dict[CommandType, str] = {
    CommandType.APPROVE: Signals.APPROVE,
    CommandType.CANCEL: Signals.CANCEL,
    CommandType.UPDATE_ADDRESS: Signals.UPDATE_ADDRESS,
}


class OutcomeKind(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    detail: str | None = None  # the rejection reason, or why the command is a duplicate
    explanation: str | None = None  # for a person, about a rejection's fixed word (`forbidden`)


ACCEPTED = Outcome(OutcomeKind.ACCEPTED)


def forbidden(explanation: str) -> Outcome:
    """A command its issuer may not send: rejected with reason `forbidden`, nothing applied."""
    return Outcome(OutcomeKind.REJECTED, FORBIDDEN, explanation)


class OrderLifecycles:
    """Starts and signals `OrderWorkflow`s on behalf of commands."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    async def start(
        self, command: PlaceOrder, queued_at: datetime, early_commands: list[EarlyCommand]
    ) -> Outcome:
        workflow_id = order_workflow_id(command.order_id)
        start = OrderWorkflowInput(
            order=command,
            policy=self._settings.lifecycle_policy(),
            queued_at=queued_at,
            first_seq=QUEUED_SEQ + 1,
            early_commands=early_commands,
        )
        try:
            await self._client.start_workflow(
                ORDER_WORKFLOW,
                start,
                id=workflow_id,
                task_queue=self._settings.order_task_queue,
                task_timeout=WORKFLOW_TASK_TIMEOUT,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                memo={PLACE_COMMAND_MEMO: str(command.command_id)},
                static_summary=order_summary(command),
            )
        except WorkflowAlreadyStartedError:
            description = await self._client.get_workflow_handle(workflow_id).describe()
            started_by = await description.memo_value(PLACE_COMMAND_MEMO, None)
            if started_by == str(command.command_id):
                return Outcome(OutcomeKind.DUPLICATE, "workflow already started by this command")
            return Outcome(OutcomeKind.REJECTED, ORDER_EXISTS)
        return ACCEPTED

    async def signal(self, command: SteeringCommand) -> Outcome:
        handle = self._client.get_workflow_handle(order_workflow_id(command.order_id))
        try:
            # the whole command is the argument: the workflow de-duplicates by its command_id
            await handle.signal(SIGNAL_OF_COMMAND[command.type], command)
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            reason = await _why_not_running(handle)
            if reason == ORDER_ENDED and await _was_applied(handle, command):
                # taken by the lifecycle before it ended, the first outcome never recorded: a duplicate
                return Outcome(OutcomeKind.DUPLICATE, APPLIED_BEFORE_THE_END)
            return Outcome(OutcomeKind.REJECTED, reason)
        return ACCEPTED


async def _why_not_running(handle: WorkflowHandle[object, OrderStatus]) -> str:
    """Tell an order that never existed from one whose lifecycle has ended."""
    try:
        description = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return UNKNOWN_ORDER
        raise
    if description.status == WorkflowExecutionStatus.RUNNING:
        # another bridge instance started it since our signal: handling the command again will work
        raise RuntimeError(f"workflow {handle.id} started while being signalled; retry the command")
    return ORDER_ENDED


async def _was_applied(handle: WorkflowHandle[object, OrderStatus], command: SteeringCommand) -> bool:
    """Whether the ended lifecycle took the command: one of its events names each one it took."""
    try:
        emitted: list[OrderEvent] = await handle.query(
            EVENTS_QUERY, result_type=list[OrderEvent], rpc_timeout=EVENTS_QUERY_TIMEOUT
        )
    except WorkflowQueryFailedError:
        return False  # a workflow without the query (not an orderflow lifecycle) took nothing of ours
    return any(event.command_id == command.command_id for event in emitted)

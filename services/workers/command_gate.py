"""Which commands apply to an order: a duplicate is ignored, one its issuer may not send is
rejected as `forbidden`, one the lifecycle no longer takes is rejected; each rejection is a
`command_rejected` event."""

from __future__ import annotations

from typing import Protocol

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from services.workers.outbox import Command
    from shared.authorization import FORBIDDEN, refusal
    from shared.contracts import CommandRejectedData, EventPayload, OrderState, OrderStatus


class Emit(Protocol):
    def __call__(self, data: EventPayload, command: Command | None = None) -> None: ...


class CommandGate:
    def __init__(self, status: OrderStatus, emit: Emit) -> None:
        self._status = status
        self._emit = emit
        self._seen: set[str] = set()

    def accept(self, command: Command, blocked: str | None) -> bool:
        """True if the command is new and may apply; `blocked` says why the lifecycle refuses it."""
        command_id = str(command.command_id)
        if command_id in self._seen:
            extra = {"order_id": self._status.order_id, "command_id": command_id}
            workflow.logger.info("duplicate command ignored", extra=extra)
            return False
        self._seen.add(command_id)
        in_review = self._status.state is OrderState.AWAITING_APPROVAL
        why = refusal(command.type, command.issued_by, self._status.placed_by, in_review)
        if why is not None:
            self._reject(command, FORBIDDEN, why)
        elif blocked is not None:
            self._reject(command, blocked)
        return why is None and blocked is None

    def _reject(self, command: Command, reason: str, detail: str | None = None) -> None:
        rejected = CommandRejectedData(command_type=command.type, reason=reason, detail=detail)
        self._emit(rejected, command)
        extra = {"order_id": self._status.order_id, "command_id": str(command.command_id)}
        workflow.logger.warning("command rejected", extra=extra | rejected.model_dump(mode="json"))

"""Request and response bodies and path parameters of the gateway, on the contract's models and bounds."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated
from uuid import UUID

from fastapi import Path
from pydantic import BaseModel, Field

from shared.contracts import (
    ApproveOrderPayload,
    CancelOrderPayload,
    CommandType,
    CorrelationId,
    Identifier,
    Model,
    OrderItem,
    OrderState,
    OrderStatus,
    PlaceOrderPayload,
    RecordedEvent,
    Step,
    UpdateAddressPayload,
)

OrderIdPath = Annotated[
    Identifier, Path(description="The order id: 1 to 64 letters, digits, '.', '_' or '-'.")
]


class ErrorMessage(BaseModel):
    """The body of every error answer but a validation error (422, FastAPI's `HTTPValidationError`)."""

    detail: str = Field(description="What went wrong, in a sentence.")


class CommandOptions(Model):
    """Fields every command request may carry besides its payload."""

    command_id: UUID | None = Field(
        default=None,
        description="Send the same id when retrying: a command id has one effect however often it "
        "arrives. Generated when absent (or taken from the Idempotency-Key header).",
    )
    correlation_id: CorrelationId | None = Field(
        default=None, description="Copied onto the command and the events it causes."
    )


class PlaceOrderRequest(CommandOptions, PlaceOrderPayload):
    order_id: Identifier | None = Field(default=None, description="Generated when absent.")


class ApproveOrderRequest(CommandOptions, ApproveOrderPayload):
    pass


class CancelOrderRequest(CommandOptions, CancelOrderPayload):
    pass


class UpdateAddressRequest(CommandOptions, UpdateAddressPayload):
    pass


# the bodies commands are sent with (their OpenAPI schemas are made by `app.openapi_document`)
REQUEST_BODIES = (PlaceOrderRequest, ApproveOrderRequest, CancelOrderRequest, UpdateAddressRequest)


class CommandAccepted(BaseModel):
    """The broker has the command (confirmed); the lifecycle applies it asynchronously."""

    command_id: UUID
    type: CommandType
    order_id: str
    status_url: str = Field(description="Where to follow the order: GET it.")


class StatusSource(StrEnum):
    WORKFLOW = "workflow"
    READ_MODEL = "read_model"


class OrderStatusView(OrderStatus):
    """An order's status: live from its workflow, or from the orders table once that is gone."""

    source: StatusSource = Field(
        description="`workflow`: the running (or recently finished) workflow's status query; "
        "`read_model`: the orders table, which lacks the step-level detail."
    )
    # the read model cannot know these, so the view relaxes them to "unknown" (null)
    step: Step | None = Field(  # type: ignore[assignment]
        default=None, description="Current step; only the workflow knows it."
    )
    shipping_attempts: int | None = Field(  # type: ignore[assignment]
        default=None, description="Only the workflow knows it."
    )
    refunded: bool | None = Field(default=None, description="Only the workflow knows it.")  # type: ignore[assignment]
    items: list[OrderItem] | None = Field(default=None, description="Only the orders table has them.")
    amount_cents: int | None = Field(default=None, description="Only the orders table has it.")


class OrderSummary(BaseModel):
    order_id: str = Field(validation_alias="id")  # read from an orders row
    state: OrderState
    payment_id: str
    amount_cents: int
    reason: str | None
    tracking_number: str | None
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    items: list[OrderSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end.")


class OrderHistory(BaseModel):
    order_id: str
    events: list[RecordedEvent] = Field(description="Ordered by `seq`, then by when they were recorded.")


class StreamedEvent(RecordedEvent):
    """An event as the streams send it: the contract's event and its place in the audit table."""

    position: int = Field(
        ge=1,
        description="Where the audit table has it, counting in commit order across all orders; "
        "also the event's SSE `id`, which resumes a stream right after it.",
    )


class MinuteCount(BaseModel):
    minute: datetime = Field(description="The minute's start (UTC).")
    count: int


class AdmissionLoad(BaseModel):
    """How busy admission is (the `admissions` table)."""

    backlog: int = Field(description="Placements registered and waiting for a lifecycle slot (`queued`).")
    running: int = Field(description="Lifecycles holding a slot.")
    max_running: int = Field(
        description="Slots: lifecycles that may run at once, across all bridges"
        " (as the gateway is configured)."
    )


class Stats(BaseModel):
    counts: dict[OrderState, int] = Field(description="Orders per state (every state, zero included).")
    total: int = Field(description="All orders.")
    admission: AdmissionLoad
    completed_per_minute: list[MinuteCount] = Field(
        description="Orders completed in each of the last minutes, oldest first; the last one is "
        "the minute under way."
    )
    position: int = Field(
        ge=0,
        description="The newest event's `position` when these figures were read (0: none yet). Follow "
        "`/events/stream` from it (`Last-Event-ID`) to miss nothing that changes them.",
    )

"""The public contract: commands into orderflow, events out of it, and an order's status.

Every other module imports these models; the README and `docs/asyncapi.json` are generated from or
checked against them. This module stays free of I/O imports because workflow code uses it too.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    field_validator,
)
from pydantic_core import PydanticCustomError

# --- bounds (documented in the AsyncAPI document) -------------------------------------------------
MAX_ITEMS = 100
MAX_QTY = 1_000
MAX_UNIT_PRICE_CENTS = 100_000_000

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
"""An order id or payment id: 1 to 64 letters, digits, '.', '_' or '-'."""

CorrelationId = Annotated[str, StringConstraints(max_length=128)]
"""A caller's id that ties related commands and events together."""

ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
OptionalText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]


class Model(BaseModel):
    """Base of every contract model: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(Model):
    name: ShortText
    line1: ShortText
    line2: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] | None = None
    city: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    region: Annotated[str, StringConstraints(strip_whitespace=True, max_length=100)] | None = None
    postal_code: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=20)]
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")] = Field(
        description="ISO 3166-1 alpha-2 code, upper case"
    )


class OrderItem(Model):
    sku: Identifier
    qty: Annotated[int, Field(ge=1, le=MAX_QTY)]
    unit_price_cents: Annotated[int, Field(ge=0, le=MAX_UNIT_PRICE_CENTS)] = Field(
        default=0, description="Optional; the payment amount is the sum of qty x unit_price_cents"
    )

    @field_validator("qty", "unit_price_cents", mode="before")
    @classmethod
    def _json_integer(cls, value: object) -> object:
        """A JSON integer (`2`, or `2.0`, which JSON Schema counts as one), as the documents say:
        pydantic alone would also make 2 of `true` or `"2"`."""
        if isinstance(value, bool | str):
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        return value


# --- who issued a command ------------------------------------------------------------------------
class Role(StrEnum):
    """What a caller may do (docs/security.md has the whole matrix)."""

    CUSTOMER = "customer"  # places orders; reads, cancels and re-addresses its own
    REVIEWER = "reviewer"  # reads every order; approves (never its own) and cancels orders in review
    OPERATOR = "operator"  # everything, the dead-letter tools included


Subject = Annotated[str, StringConstraints(min_length=1, max_length=255)]
"""Who a caller is: a bearer token's `sub`, or the broker-validated `user_id` of an AMQP publisher."""


class Actor(Model):
    """The verified identity a command was issued by, and its roles. Never taken from a publisher's
    word: the gateway sets it from the bearer token, the bridge from the broker-validated `user_id`
    (or, for a publisher configured as a delegate, such as the gateway, from what it names)."""

    subject: Subject
    roles: frozenset[Role] = frozenset()

    def has(self, *roles: Role) -> bool:
        return not self.roles.isdisjoint(roles)


# --- commands -------------------------------------------------------------------------------------
class CommandType(StrEnum):
    PLACE = "PlaceOrder"
    APPROVE = "ApproveOrder"
    CANCEL = "CancelOrder"
    UPDATE_ADDRESS = "UpdateAddress"


class PlaceOrderPayload(Model):
    payment_id: Identifier
    items: Annotated[list[OrderItem], Field(min_length=1, max_length=MAX_ITEMS)]
    address: Address

    @property
    def amount_cents(self) -> int:
        return sum(item.qty * item.unit_price_cents for item in self.items)


class ApproveOrderPayload(Model):
    note: OptionalText | None = None


class CancelOrderPayload(Model):
    reason: ShortText | None = None


class UpdateAddressPayload(Model):
    address: Address


class _CommandEnvelope(Model):
    command_id: UUID
    order_id: Identifier
    issued_at: AwareDatetime
    correlation_id: CorrelationId | None = None
    issued_by: Actor | None = Field(
        default=None,
        description="Set by orderflow from the publisher's verified identity. Only a publisher "
        "configured as a delegate (the REST gateway) may name someone else; from any other, a value "
        "that differs from its own identity gets the command rejected as `forbidden`.",
    )


class PlaceOrder(_CommandEnvelope):
    type: Literal[CommandType.PLACE] = CommandType.PLACE
    payload: PlaceOrderPayload


class ApproveOrder(_CommandEnvelope):
    type: Literal[CommandType.APPROVE] = CommandType.APPROVE
    payload: ApproveOrderPayload = ApproveOrderPayload()


class CancelOrder(_CommandEnvelope):
    type: Literal[CommandType.CANCEL] = CommandType.CANCEL
    payload: CancelOrderPayload = CancelOrderPayload()


class UpdateAddress(_CommandEnvelope):
    type: Literal[CommandType.UPDATE_ADDRESS] = CommandType.UPDATE_ADDRESS
    payload: UpdateAddressPayload


Command = Annotated[PlaceOrder | ApproveOrder | CancelOrder | UpdateAddress, Field(discriminator="type")]
command_adapter: TypeAdapter[Command] = TypeAdapter(Command)

COMMAND_ROUTING_KEYS: dict[CommandType, str] = {
    CommandType.PLACE: "order.place",
    CommandType.APPROVE: "order.approve",
    CommandType.CANCEL: "order.cancel",
    CommandType.UPDATE_ADDRESS: "order.update_address",
}


# --- events ---------------------------------------------------------------------------------------
class EventType(StrEnum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    RECEIVED = "received"
    VALIDATED = "validated"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    PAYMENT_CHARGED = "payment_charged"
    SHIPPING_STARTED = "shipping_started"
    PACKAGE_PREPARED = "package_prepared"
    CARRIER_DISPATCHED = "carrier_dispatched"
    DISPATCH_FAILED = "dispatch_failed"
    SHIPPED = "shipped"
    COMPLETED = "completed"
    ADDRESS_UPDATED = "address_updated"
    CANCELLED = "cancelled"
    FAILED = "failed"
    TERMINATED = "terminated"  # the workflow was terminated: its ending written by the reconciler
    COMMAND_REJECTED = "command_rejected"

    @property
    def routing_key(self) -> str:
        return f"order.{self.value}"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EVENTS


TERMINAL_EVENTS = frozenset(
    {EventType.COMPLETED, EventType.CANCELLED, EventType.FAILED, EventType.TERMINATED}
)


class OrderEvent(Model):
    """One lifecycle event. `seq` is 1, 2, 3, ... per order without gaps; 0 marks a
    `command_rejected` for an order that has no running lifecycle (unknown or already ended)."""

    event_id: UUID
    type: EventType
    order_id: Identifier
    seq: Annotated[int, Field(ge=0)]
    occurred_at: AwareDatetime
    correlation_id: str | None = None
    command_id: UUID | None = None
    data: dict[str, Any] = Field(default_factory=dict)


# --- status ---------------------------------------------------------------------------------------
class OrderState(StrEnum):
    """Where an order stands. `queued`: accepted, waiting for the bridge to admit its lifecycle."""

    QUEUED = "queued"
    RECEIVED = "received"
    VALIDATED = "validated"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    PAID = "paid"
    SHIPPING = "shipping"
    SHIPPED = "shipped"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    TERMINATED = "terminated"  # its workflow was terminated (no workflow code ran at the end)

    @property
    def is_terminal(self) -> bool:
        return self in (
            OrderState.COMPLETED,
            OrderState.CANCELLED,
            OrderState.FAILED,
            OrderState.TERMINATED,
        )


class Step(StrEnum):
    """The lifecycle's steps, in order; each business step is one business function."""

    RECEIVE = "receive"
    VALIDATE = "validate"
    REVIEW = "review"
    CHARGE_PAYMENT = "charge_payment"
    PREPARE_PACKAGE = "prepare_package"
    DISPATCH_CARRIER = "dispatch_carrier"
    MARK_SHIPPED = "mark_shipped"
    REFUND = "refund"
    DONE = "done"


class StepError(Model):
    step: Step
    attempt: int
    error: str
    at: datetime


class OrderStatus(BaseModel):
    """What the workflow's `status` query returns and the REST gateway shows."""

    order_id: str
    state: OrderState
    step: Step
    address: Address
    payment_id: str
    placed_by: str | None = None
    """The subject that placed the order (None: placed before identities were recorded)."""
    approved_by: str | None = None
    """The subject that approved it, once approved."""
    attempts: dict[Step, int] = Field(default_factory=dict)
    recent_errors: list[StepError] = Field(default_factory=list)
    shipping_attempts: int = 0
    refunded: bool = False
    reason: str | None = None
    tracking_number: str | None = None
    queued_at: datetime | None = None
    """When the bridge took the placement in; `started_at - queued_at` is the admission wait."""
    waiting_for_slot_since: datetime | None = None
    """Approved after giving its admission slot back for the review, it waits for one to go on
    (ahead of every waiting placement) since then; None while it holds one or needs none."""
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None

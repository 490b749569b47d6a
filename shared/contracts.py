"""The public contract: commands into orderflow, events out of it, and an order's status.

`docs/asyncapi.json` is generated from these models (their docstrings are its summaries). Free of
I/O imports: workflow code uses this module too."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

MAX_ITEMS = 100
MAX_QTY = 1_000

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
"""An order id, payment id or SKU."""

CorrelationId = Annotated[str, StringConstraints(max_length=128)]
"""A caller's id that ties related commands and events together."""

ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


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
    unit_price_cents: Annotated[int, Field(ge=0, le=100_000_000)] = Field(
        default=0, description="Optional; the payment amount is the sum of qty x unit_price_cents"
    )

    @field_validator("qty", "unit_price_cents", mode="before")
    @classmethod
    def _json_integer(cls, value: object) -> object:
        """A JSON integer (`2`, or `2.0`), as documented: pydantic alone would also take `true` or `"2"`."""
        if isinstance(value, bool | str):
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        return value


class Role(StrEnum):
    """What a caller may do (docs/security.md has the whole matrix)."""

    CUSTOMER = "customer"  # places orders; reads, cancels and re-addresses its own
    REVIEWER = "reviewer"  # reads every order; approves (never its own) and cancels orders in review
    OPERATOR = "operator"  # everything, the dead-letter tools included


Subject = Annotated[str, StringConstraints(min_length=1, max_length=255)]
"""Who a caller is: a bearer token's `sub`, or the broker-validated `user_id` of an AMQP publisher."""


class Actor(Model):
    """The verified issuer of a command and its roles, never taken from a publisher's word."""

    subject: Subject
    # written sorted: the same actor is the same JSON in every process (a set has no order of its own)
    roles: Annotated[frozenset[Role], PlainSerializer(sorted, return_type=list[Role])] = frozenset()

    def has(self, *roles: Role) -> bool:
        return not self.roles.isdisjoint(roles)


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
    note: Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)] | None = None


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
    """Place a new order: `queued` until the bridge admits its lifecycle (ORDERFLOW_MAX_RUNNING_LIFECYCLES
    run at once), whose 15 seconds count from then. Refused (basic.nack) while the backlog is full:
    retry later with the same command_id. An existing order id starts no second lifecycle."""

    type: Literal[CommandType.PLACE] = CommandType.PLACE
    payload: PlaceOrderPayload


class ApproveOrder(_CommandEnvelope):
    """Approve an order that waits for manual review (sent while it is queued, it applies when review
    comes). From a reviewer or an operator, never from the order's own placer (four eyes)."""

    type: Literal[CommandType.APPROVE] = CommandType.APPROVE
    payload: ApproveOrderPayload = ApproveOrderPayload()


class CancelOrder(_CommandEnvelope):
    """Cancel an order, until dispatch: after payment it is refunded, a queued order never starts.
    From its placer, an operator, or a reviewer while the order is in review."""

    type: Literal[CommandType.CANCEL] = CommandType.CANCEL
    payload: CancelOrderPayload = CancelOrderPayload()


class UpdateAddress(_CommandEnvelope):
    """Change the shipping address, until dispatch (for a queued order, as its lifecycle starts).
    From its placer or an operator."""

    type: Literal[CommandType.UPDATE_ADDRESS] = CommandType.UPDATE_ADDRESS
    payload: UpdateAddressPayload


Command = Annotated[PlaceOrder | ApproveOrder | CancelOrder | UpdateAddress, Field(discriminator="type")]
command_adapter: TypeAdapter[Command] = TypeAdapter(Command)

# order.place, order.approve, order.cancel, order.update_address
COMMAND_ROUTING_KEYS = {command: f"order.{command.name.lower()}" for command in CommandType}


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
    TERMINATED = "terminated"
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


IsoTimestamp = Annotated[
    AwareDatetime, PlainSerializer(datetime.isoformat, return_type=str, when_used="json")
]
"""Written as Python's `isoformat` (`+00:00`, not `Z`), as these fields always were."""


def _absent(value: object) -> bool:
    return value is None


class EventData(Model):
    """Base of the event payloads, one model per event type: the `data` of its events."""

    event_type: ClassVar[EventType]

    def __init_subclass__(cls, event_type: EventType) -> None:
        super().__init_subclass__()
        cls.event_type = event_type


class QueuedData(EventData, event_type=EventType.QUEUED):
    """The placement was accepted and waits for admission (seq 1)."""

    queued_at: IsoTimestamp
    placed_by: Subject | None


class AdmittedData(EventData, event_type=EventType.ADMITTED):
    """The lifecycle started: its 15 seconds count from here."""

    queued_at: IsoTimestamp | None = Field(description="null: started without waiting in the queue")
    admission_wait_seconds: float | None


class ReceivedData(EventData, event_type=EventType.RECEIVED):
    """The order was recorded."""

    placed_by: Subject | None


class ValidatedData(EventData, event_type=EventType.VALIDATED):
    """The order passed validation."""


class AwaitingApprovalData(EventData, event_type=EventType.AWAITING_APPROVAL):
    """The order waits for an ApproveOrder; at the end of its review window without one
    (ORDERFLOW_REVIEW_WINDOW_SECONDS) it is cancelled with reason review_timeout."""

    review_window_seconds: float


class ApprovedData(EventData, event_type=EventType.APPROVED):
    """A reviewer approved the order."""

    approved_by: Subject | None = Field(description="The verified subject that sent the approval")
    note: str | None


class PaymentChargedData(EventData, event_type=EventType.PAYMENT_CHARGED):
    """The payment was charged (once per payment_id)."""

    amount_cents: int
    already_charged: bool = Field(description="True: this payment_id had been charged before")


class ShippingStartedData(EventData, event_type=EventType.SHIPPING_STARTED):
    """Shipping started."""

    shipping_attempt: int = Field(ge=1)


class PackagePreparedData(EventData, event_type=EventType.PACKAGE_PREPARED):
    """The package was prepared."""


class CarrierDispatchedData(EventData, event_type=EventType.CARRIER_DISPATCHED):
    """A carrier took the package."""

    tracking_number: str
    address: Address = Field(description="Where the carrier takes the package")


class DispatchFailedData(EventData, event_type=EventType.DISPATCH_FAILED):
    """A dispatch failed; shipping is retried a bounded number of times."""

    reason: str
    shipping_attempt: int = Field(ge=1)


class ShippedData(EventData, event_type=EventType.SHIPPED):
    """The order was marked shipped."""

    tracking_number: str


class CompletedData(EventData, event_type=EventType.COMPLETED):
    """The lifecycle finished successfully."""


class AddressUpdatedData(EventData, event_type=EventType.ADDRESS_UPDATED):
    """The shipping address changed."""

    address: Address


class CancelledData(EventData, event_type=EventType.CANCELLED):
    """The order was cancelled."""

    reason: str
    refunded: bool
    admitted: bool | None = Field(
        default=None,
        exclude_if=_absent,
        description="false for an order cancelled while queued; absent otherwise",
    )


class FailedData(EventData, event_type=EventType.FAILED):
    """The lifecycle failed."""

    reason: str
    refunded: bool


class TerminatedData(EventData, event_type=EventType.TERMINATED):
    """The order's workflow was terminated through Temporal (or timed out or failed there), so none
    of its own code ran at the end; written by the reconciler."""

    reason: str = Field(description="Includes the termination's reason")
    workflow_status: str = Field(description="How Temporal closed the workflow, such as TERMINATED")
    charged: bool = Field(description="Whether the payment had been charged")
    refunded: bool = Field(description="Every charge is refunded")


class CommandRejectedData(EventData, event_type=EventType.COMMAND_REJECTED):
    """A command could not apply (a cancel after shipment, an approve of an unknown order, ...); the
    event's `command_id` names it. Nothing was applied."""

    command_type: CommandType
    reason: str = Field(description="`forbidden`: the command's issuer may not send it")
    detail: str | None = Field(
        default=None, exclude_if=_absent, description="Why, for reason `forbidden`; absent otherwise"
    )


EventPayload = (
    QueuedData
    | AdmittedData
    | ReceivedData
    | ValidatedData
    | AwaitingApprovalData
    | ApprovedData
    | PaymentChargedData
    | ShippingStartedData
    | PackagePreparedData
    | CarrierDispatchedData
    | DispatchFailedData
    | ShippedData
    | CompletedData
    | AddressUpdatedData
    | CancelledData
    | FailedData
    | TerminatedData
    | CommandRejectedData
)

EVENT_DATA: dict[EventType, type[EventPayload]] = {model.event_type: model for model in EventPayload.__args__}


_EXAMPLE_TIME = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_EXAMPLE_ADDRESS = Address(
    name="Ada Lovelace", line1="12 St James's Square", city="London", postal_code="SW1Y 4JH", country="GB"
)
EXAMPLE_DATA: dict[EventType, EventPayload] = {
    data.event_type: data
    for data in (
        QueuedData(queued_at=_EXAMPLE_TIME, placed_by="alice"),
        AdmittedData(queued_at=_EXAMPLE_TIME, admission_wait_seconds=0.25),
        ReceivedData(placed_by="alice"),
        ValidatedData(),
        AwaitingApprovalData(review_window_seconds=300.0),
        ApprovedData(approved_by="rita", note="looks fine"),
        PaymentChargedData(amount_cents=2_500, already_charged=False),
        ShippingStartedData(shipping_attempt=1),
        PackagePreparedData(),
        CarrierDispatchedData(tracking_number="TRK-1", address=_EXAMPLE_ADDRESS),
        DispatchFailedData(reason="carrier refused the package", shipping_attempt=1),
        ShippedData(tracking_number="TRK-1"),
        CompletedData(),
        AddressUpdatedData(address=_EXAMPLE_ADDRESS),
        CancelledData(reason="cancelled on request", refunded=False),
        FailedData(reason="payment declined", refunded=False),
        TerminatedData(
            reason="terminated through Temporal by ops: duplicate",
            workflow_status="TERMINATED",
            charged=True,
            refunded=True,
        ),
        CommandRejectedData(command_type=CommandType.CANCEL, reason="order already dispatched"),
    )
}
"""An example payload of each event type (the AsyncAPI document shows them)."""


class EventEnvelope(Model):
    """What every event carries besides its `data`."""

    event_id: UUID
    type: EventType
    order_id: Identifier
    seq: Annotated[int, Field(ge=0)]
    occurred_at: AwareDatetime
    correlation_id: str | None = None
    command_id: UUID | None = None


def _typed_data(data: object, _: ValidatorFunctionWrapHandler, info: ValidationInfo) -> EventPayload:
    """`data` read as its event type's model only, so payloads of the same shape stay apart."""
    event_type = info.data.get("type")  # validated before `data`
    if event_type is None:
        raise ValueError("an event's data is read by its type, which is not valid")
    model = EVENT_DATA[event_type]
    return data if isinstance(data, model) else model.model_validate(data)


def _recorded_data(
    data: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
) -> EventPayload | dict[str, JsonValue]:
    try:
        return _typed_data(data, handler, info)
    except ValidationError:
        return _JSON_OBJECT.validate_python(data)


_JSON_OBJECT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])


class OrderEvent(EventEnvelope):
    """One lifecycle event. `seq` is 1, 2, 3, ... per order without gaps; 0 marks a
    `command_rejected` for an order that has no running lifecycle (unknown or already ended)."""

    data: Annotated[EventPayload, WrapValidator(_typed_data)]


class RecordedEvent(EventEnvelope):
    """An event as the audit table holds it; `data` of another shape (older, or by hand) stays as stored."""

    data: Annotated[EventPayload | dict[str, JsonValue], WrapValidator(_recorded_data)]


def event_of(
    data: EventPayload,
    *,
    event_id: UUID,
    order_id: str,
    seq: int,
    occurred_at: datetime,
    correlation_id: str | None = None,
    command_id: UUID | None = None,
) -> OrderEvent:
    """The event whose `data` is `data` (its type follows from the payload)."""
    return OrderEvent(
        event_id=event_id,
        type=data.event_type,
        order_id=order_id,
        seq=seq,
        occurred_at=occurred_at,
        correlation_id=correlation_id,
        command_id=command_id,
        data=data,
    )


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
    TERMINATED = "terminated"  # its workflow was terminated: no workflow code ran at the end

    @property
    def is_terminal(self) -> bool:
        return self in {OrderState.COMPLETED, OrderState.CANCELLED, OrderState.FAILED, OrderState.TERMINATED}


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
    """None: placed before identities were recorded."""
    approved_by: str | None = None
    attempts: dict[Step, int] = Field(default_factory=dict)
    recent_errors: list[StepError] = Field(default_factory=list)
    shipping_attempts: int = 0
    refunded: bool = False
    reason: str | None = None
    tracking_number: str | None = None
    queued_at: datetime | None = None
    """When the bridge took the placement in; `started_at - queued_at` is the admission wait."""
    waiting_for_slot_since: datetime | None = None
    """Approved, it waits for a slot again (ahead of every placement); None: it holds one or needs none."""
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None

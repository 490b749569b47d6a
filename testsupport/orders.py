"""Sample orders, the commands and events about them, the people who issue them, and unique ids."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from shared.contracts import (
    EXAMPLE_DATA,
    Actor,
    Address,
    ApproveOrder,
    CancelOrder,
    EventType,
    OrderEvent,
    OrderItem,
    PlaceOrder,
    PlaceOrderPayload,
    Role,
    UpdateAddress,
    UpdateAddressPayload,
)

BROKER_USER = "guest"
"""The tests' broker user (the connections' `user_id`): the base settings give it every role and
make it a delegate, so a test may also publish on behalf of another actor."""
GUEST = Actor(subject=BROKER_USER, roles=frozenset(Role))
"""The tests' broker user as an issuer: the bridge resolves it for a command without `issued_by`."""
TEST_REVIEWER = Actor(subject="test-reviewer", roles=frozenset({Role.REVIEWER}))
"""Who approves: never the placer (four eyes), so `GUEST` names this reviewer in approvals."""

ADDRESS: dict[str, Any] = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}
ITEMS: list[dict[str, Any]] = [{"sku": "BOOK-1", "qty": 2, "unit_price_cents": 1250}]
NEW_ADDRESS: dict[str, Any] = {**ADDRESS, "line1": "1 Dorset Street", "postal_code": "W1U 4EG"}
ONCE_PER_COMPLETED_ORDER = (
    "queued",
    "admitted",
    "received",
    "validated",
    "approved",
    "payment_charged",
    "shipped",
    "completed",
)
"""The steps a completed order takes once each, as its events' types."""


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid4().hex[:12]}"


def order_body(**overrides: Any) -> dict[str, Any]:
    """A valid `POST /orders` body."""
    return {"payment_id": unique_id("pay"), "items": ITEMS, "address": ADDRESS, **overrides}


def order_body_of(placement: PlaceOrder) -> dict[str, Any]:
    """The `POST /orders` body that places as `placement` does, with its command id."""
    return {
        "order_id": placement.order_id,
        "command_id": str(placement.command_id),
        **placement.payload.model_dump(mode="json", exclude_none=True),
    }


def place_order(
    order_id: str | None = None,
    *,
    issued_by: Actor | None = GUEST,
    command_id: UUID | None = None,
    payment_id: str | None = None,
    items: list[OrderItem] | None = None,
    address: Address | None = None,
    correlation_id: str | None = None,
) -> PlaceOrder:
    """A placement of the sample order (`order_id`: a new one) paid with `pay-<order id>` and
    correlated as `corr-<order id>`, unless told otherwise; `issued_by` None: by the publisher."""
    order_id = order_id or unique_id("order")
    payload = PlaceOrderPayload(
        payment_id=payment_id or f"pay-{order_id}",
        items=[OrderItem.model_validate(item) for item in ITEMS] if items is None else items,
        address=address or Address.model_validate(ADDRESS),
    )
    return PlaceOrder(
        command_id=command_id or uuid4(),
        order_id=order_id,
        issued_at=datetime.now(UTC),
        correlation_id=correlation_id or f"corr-{order_id}",
        issued_by=issued_by,
        payload=payload,
    )


def approve_order(
    order_id: str, *, issued_by: Actor | None = TEST_REVIEWER, command_id: UUID | None = None
) -> ApproveOrder:
    """By a reviewer the tests' broker user names (it placed the order: four eyes)."""
    return ApproveOrder(
        command_id=command_id or uuid4(), order_id=order_id, issued_at=datetime.now(UTC), issued_by=issued_by
    )


def cancel_order(order_id: str, *, issued_by: Actor | None = GUEST) -> CancelOrder:
    return CancelOrder(
        command_id=uuid4(), order_id=order_id, issued_at=datetime.now(UTC), issued_by=issued_by
    )


def update_address(order_id: str, address: dict[str, Any] = NEW_ADDRESS) -> UpdateAddress:
    return UpdateAddress(
        command_id=uuid4(),
        order_id=order_id,
        issued_at=datetime.now(UTC),
        issued_by=GUEST,
        payload=UpdateAddressPayload(address=Address.model_validate(address)),
    )


def example_event(
    order_id: str, seq: int, event_type: EventType, occurred_at: datetime | None = None
) -> OrderEvent:
    """An event of `event_type` carrying the type's example data, as of now unless told otherwise."""
    return OrderEvent(
        event_id=uuid4(),
        type=event_type,
        order_id=order_id,
        seq=seq,
        occurred_at=occurred_at or datetime.now(UTC),
        data=EXAMPLE_DATA[event_type],
    )

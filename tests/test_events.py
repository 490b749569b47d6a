"""Events are typed by their `type`: each carries its type's payload model, on the wire and read back
from the audit table, and keeps the JSON form subscribers already read (in memory, no servers)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from pydantic import JsonValue, ValidationError

from shared.contracts import (
    EVENT_DATA,
    EXAMPLE_DATA,
    AdmittedData,
    CancelledData,
    CommandRejectedData,
    CommandType,
    EventType,
    OrderEvent,
    RecordedEvent,
    event_of,
)


def an_event(event_type: EventType) -> OrderEvent:
    return event_of(
        EXAMPLE_DATA[event_type], event_id=uuid4(), order_id="ord-1", seq=1, occurred_at=datetime.now(UTC)
    )


@dataclass
class AuditRow:
    """What the audit table gives back: `data` as the JSON object it stores."""

    event_id: UUID
    type: str
    order_id: str
    seq: int
    occurred_at: datetime
    correlation_id: str | None
    command_id: UUID | None
    data: dict[str, JsonValue]
    position: int


def row_of(event: OrderEvent, data: dict[str, JsonValue] | None = None) -> AuditRow:
    fields = event.model_dump(mode="json")
    return AuditRow(
        event_id=event.event_id,
        type=event.type.value,
        order_id=event.order_id,
        seq=event.seq,
        occurred_at=event.occurred_at,
        correlation_id=None,
        command_id=None,
        data=fields["data"] if data is None else data,
        position=7,
    )


def test_every_event_type_has_its_payload_model_and_an_example() -> None:
    assert set(EVENT_DATA) == set(EXAMPLE_DATA) == set(EventType)
    assert all(type(EXAMPLE_DATA[event_type]) is EVENT_DATA[event_type] for event_type in EventType)


@pytest.mark.parametrize("event_type", list(EventType))
def test_an_event_reads_back_with_its_own_payload_model(event_type: EventType) -> None:
    """Payloads of the same shape (`validated`, `package_prepared`, `completed`: none) stay apart:
    `data` is read as the model of the event's `type`, and only that model is accepted."""
    sent = an_event(event_type)
    received = OrderEvent.model_validate_json(sent.model_dump_json())
    assert received == sent and type(received.data) is EVENT_DATA[event_type]
    other = next(
        one for one in EventType if EVENT_DATA[one].model_fields != EVENT_DATA[event_type].model_fields
    )
    with pytest.raises(ValidationError):
        OrderEvent.model_validate({**sent.model_dump(), "data": EXAMPLE_DATA[other].model_dump()})


@pytest.mark.parametrize("event_type", list(EventType))
def test_an_audit_row_reads_back_as_its_typed_event(event_type: EventType) -> None:
    sent = an_event(event_type)
    recorded = RecordedEvent.model_validate(row_of(sent), from_attributes=True)
    assert type(recorded.data) is EVENT_DATA[event_type]
    assert recorded.data == sent.data


def test_an_audit_row_of_another_shape_reads_back_as_stored() -> None:
    foreign: dict[str, JsonValue] = {"seq_was": 1}
    recorded = RecordedEvent.model_validate(
        row_of(an_event(EventType.RECEIVED), foreign), from_attributes=True
    )
    assert recorded.data == foreign
    assert recorded.model_dump(mode="json")["data"] == foreign


def test_optional_fields_keep_their_wire_form() -> None:
    """A field optional on the wire is left out when unset; the others are written, null or not."""
    rejected = CommandRejectedData(command_type=CommandType.APPROVE, reason="unknown order")
    assert rejected.model_dump(mode="json") == {"command_type": "ApproveOrder", "reason": "unknown order"}
    cancelled = CancelledData(reason="cancelled on request", refunded=False)
    assert cancelled.model_dump(mode="json") == {"reason": "cancelled on request", "refunded": False}
    admitted = AdmittedData(queued_at=None, admission_wait_seconds=None)
    assert admitted.model_dump(mode="json") == {"queued_at": None, "admission_wait_seconds": None}
    queued_at = datetime(2026, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    waited = AdmittedData(queued_at=queued_at, admission_wait_seconds=0.5)
    assert waited.model_dump(mode="json")["queued_at"] == queued_at.isoformat()  # `+00:00`, as always

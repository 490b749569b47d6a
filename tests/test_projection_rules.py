"""What events bring to the `orders` read model, in memory, no servers: the rules the audit
consumer's projection applies (tests/test_audit.py has them applied to the table)."""

from __future__ import annotations

from functools import partial

from services.audit.projection import changes_of, fact_value, reason_of
from shared.contracts import Address, EventType, RecordedEvent
from testsupport.orders import ADDRESS, NEW_ADDRESS
from testsupport.read_model import event

event_of_o1 = partial(event, "o-1")


def test_the_newest_state_changing_event_of_each_order_wins_whatever_the_arrival_order() -> None:
    charged, validated = event_of_o1(5, EventType.PAYMENT_CHARGED), event_of_o1(2, EventType.VALIDATED)
    others = event("o-2", 1, EventType.RECEIVED)
    address_change = event_of_o1(6, EventType.ADDRESS_UPDATED, address=NEW_ADDRESS)

    changes = changes_of([charged, validated, others, address_change])

    assert changes.states == {"o-1": charged, "o-2": others}  # an address change is no state


def test_a_rejection_outside_any_lifecycle_brings_nothing() -> None:
    changes = changes_of([event_of_o1(0, EventType.COMMAND_REJECTED, reason="unknown order")])
    assert (changes.states, changes.reasons, changes.facts) == ({}, {}, [])


def test_the_reason_is_the_newest_one_given() -> None:
    failed = event_of_o1(5, EventType.FAILED, reason="payment declined")
    terminated = event_of_o1(6, EventType.TERMINATED, reason="")

    changes = changes_of([failed, terminated])

    assert (changes.states["o-1"], changes.reasons["o-1"]) == (terminated, failed)
    assert (reason_of(failed.data), reason_of(terminated.data)) == ("payment declined", None)


def test_each_fact_comes_from_the_newest_event_of_its_type() -> None:
    addresses = [event_of_o1(seq, EventType.ADDRESS_UPDATED, address=NEW_ADDRESS) for seq in (3, 4)]
    dispatched = event_of_o1(7, EventType.CARRIER_DISPATCHED, tracking_number="TRK-1", address=ADDRESS)
    shipped = event_of_o1(8, EventType.SHIPPED, tracking_number="TRK-2")

    changes = changes_of([addresses[1], dispatched, addresses[0], shipped])

    assert changes.facts == [addresses[1], dispatched, shipped]
    # the dispatch's address is where the package went, not a change of the order's
    assert [fact_value(e) for e in changes.facts] == [
        Address.model_validate(NEW_ADDRESS),
        "TRK-1",
        "TRK-2",
    ]


def test_a_newest_event_without_a_value_leaves_its_column_as_it_is() -> None:
    named, anonymous = (
        event_of_o1(1, EventType.QUEUED, placed_by="alice"),
        event_of_o1(2, EventType.QUEUED, placed_by=None),
    )
    received = event_of_o1(3, EventType.RECEIVED, placed_by="alice")

    assert changes_of([named, anonymous, received]).facts == [received]


def test_an_event_stored_in_another_shape_still_moves_the_state() -> None:
    stored = RecordedEvent.model_validate(
        {**event_of_o1(4, EventType.CANCELLED).model_dump(), "data": {"written": "by hand"}}
    )

    changes = changes_of([stored])

    assert (changes.states, changes.reasons, changes.facts) == ({"o-1": stored}, {}, [])

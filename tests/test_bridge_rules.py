"""The bridge's rules in memory, no servers: what the admission gate decides from an order's
`admissions` row, who may send a command over AMQP, which bodies are commands at all, the events
the bridge publishes, and how it tells transient failures apart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import DBAPIError
from temporalio.service import RPCError, RPCStatusCode

from services.bridge.admission_gate import (
    APPLIES_AT_START,
    CANCELLED_BEFORE_ADMISSION,
    ENDED_BEFORE_ADMISSION,
    NO_REASON_GIVEN,
    PLACED_BY_ANOTHER,
    WAITING_FOR_PLACEMENT,
    AdmissionInProgress,
    AdmissionRecord,
    Registration,
    Signal,
    Slot,
    judge_parked,
    order_listing,
    registered_before,
    steering,
)
from services.bridge.consumer import OrderLocks, registration_events, rejection_event
from services.bridge.issuers import NO_ROLE, NO_USER_ID, NOT_A_DELEGATE, PublisherIdentities
from services.bridge.lifecycles import UNKNOWN_ORDER, Outcome, OutcomeKind, SteeringCommand, forbidden
from shared.admission_table import AdmissionStatus
from shared.authorization import FORBIDDEN
from shared.consuming import InvalidMessage, is_transient, parse_body
from shared.contracts import (
    Actor,
    CancelOrder,
    CancelOrderPayload,
    Command,
    EventType,
    PlaceOrder,
    Role,
    command_adapter,
)
from testsupport.orders import GUEST, approve_order, cancel_order, place_order, update_address

STRANGER = Actor(subject="stranger", roles=frozenset({Role.CUSTOMER}))
QUEUED_AT = datetime(2026, 1, 1, tzinfo=UTC)
PLACEMENT = place_order("o-1")
UNPLACED = AdmissionRecord(AdmissionStatus.UNPLACED, None, None, None, [], None)
"""An order's row while its commands wait for its placement."""


def placed(status: AdmissionStatus, *commands: Command, cancel: CancelOrder | None = None) -> AdmissionRecord:
    """An order's row once GUEST placed it with `PLACEMENT`."""
    cancelled_by = cancel.command_id if cancel else None
    return AdmissionRecord(
        status, PLACEMENT.command_id, GUEST.subject, cancelled_by, list(commands), QUEUED_AT
    )


def by_stranger(command: SteeringCommand) -> SteeringCommand:
    return command.model_copy(update={"issued_by": STRANGER})


# --- the admission gate's decisions ----------------------------------------------------------------
def test_parked_commands_are_kept_if_the_placer_allows_them_and_refused_otherwise() -> None:
    cancel, approval = cancel_order("o-1"), approve_order("o-1")
    strangers_cancel, own_approval = by_stranger(cancel_order("o-1")), approve_order("o-1", issued_by=GUEST)

    kept, refused = judge_parked([cancel, strangers_cancel, approval, own_approval], GUEST.subject)

    assert kept == [cancel, approval]
    assert [(command, outcome.kind, outcome.detail) for command, outcome in refused] == [
        (strangers_cancel, OutcomeKind.REJECTED, FORBIDDEN),
        (own_approval, OutcomeKind.REJECTED, FORBIDDEN),
    ]


def test_a_placement_finds_its_own_registration_or_anothers() -> None:
    approval, cancel = approve_order("o-1"), cancel_order("o-1")
    running = placed(AdmissionStatus.RUNNING, approval, cancel)

    assert registered_before(running, place_order("o-1")) is PLACED_BY_ANOTHER
    # delivered again: a slot taken before is its own, with the commands kept for its start
    assert registered_before(running, PLACEMENT) == Registration(
        AdmissionStatus.RUNNING, QUEUED_AT, slot=Slot(QUEUED_AT, [approval])
    )
    waiting = placed(AdmissionStatus.WAITING)
    assert registered_before(waiting, PLACEMENT) == Registration(AdmissionStatus.WAITING, QUEUED_AT)


@pytest.mark.parametrize(
    ("status", "decision"),
    [
        (AdmissionStatus.RUNNING, Signal.STARTED),
        (AdmissionStatus.REVIEWING, Signal.STARTED),
        (AdmissionStatus.RESUMING, Signal.STARTED),
        (AdmissionStatus.ENDED, Signal.STARTED),
        (AdmissionStatus.CANCELLED, ENDED_BEFORE_ADMISSION),
        (AdmissionStatus.UNPLACED, WAITING_FOR_PLACEMENT),
    ],
)
def test_a_command_goes_to_the_lifecycle_or_is_settled_by_the_orders_status(
    status: AdmissionStatus, decision: Outcome | Signal
) -> None:
    row = UNPLACED if status is AdmissionStatus.UNPLACED else placed(status)
    assert steering(row, approve_order("o-1")) == decision


def test_a_command_for_a_waiting_order_applies_to_it_if_its_placer_allows() -> None:
    waiting = placed(AdmissionStatus.WAITING)

    assert steering(waiting, approve_order("o-1")) is APPLIES_AT_START
    assert steering(waiting, update_address("o-1")) is APPLIES_AT_START
    assert steering(waiting, cancel_order("o-1")) is CANCELLED_BEFORE_ADMISSION
    for refused in (by_stranger(cancel_order("o-1")), approve_order("o-1", issued_by=GUEST)):
        decision = steering(waiting, refused)
        assert isinstance(decision, Outcome) and decision.detail == FORBIDDEN


def test_a_cancel_delivered_again_finds_its_effect_and_any_other_command_the_end() -> None:
    cancel = cancel_order("o-1")
    cancelled = placed(AdmissionStatus.CANCELLED, cancel, cancel=cancel)

    assert steering(cancelled, cancel) is CANCELLED_BEFORE_ADMISSION
    assert steering(cancelled, cancel_order("o-1")) is ENDED_BEFORE_ADMISSION


def test_without_a_row_a_command_is_signalled_if_a_lifecycle_exists() -> None:
    assert steering(None, approve_order("o-1")) is Signal.IF_ANY


def test_a_command_waits_while_another_bridge_starts_the_lifecycle() -> None:
    admitting = placed(AdmissionStatus.ADMITTING)
    with pytest.raises(AdmissionInProgress):
        steering(admitting, approve_order("o-1"))


def test_the_orders_row_is_listed_as_its_registrations_events_leave_it() -> None:
    placement = place_order("o-1")
    with_reason = cancel_order("o-1").model_copy(update={"payload": CancelOrderPayload(reason="too late")})

    listings = [order_listing(placement, cancel) for cancel in (None, with_reason, cancel_order("o-1"))]

    assert [(row["state"], row["last_event_seq"], row["reason"]) for row in listings] == [
        ("queued", 1, None),
        ("cancelled", 2, "too late"),
        ("cancelled", 2, NO_REASON_GIVEN),
    ]
    assert all(row["id"] == "o-1" and row["placed_by"] == GUEST.subject for row in listings)


def test_a_registration_publishes_queued_the_refusals_and_the_cancel_that_ends_it() -> None:
    placement, cancel, strangers = place_order("o-1"), cancel_order("o-1"), by_stranger(approve_order("o-1"))
    refusal = (strangers, forbidden(NO_ROLE))
    registration = Registration(AdmissionStatus.CANCELLED, QUEUED_AT, cancel, refused=(refusal,))

    events = registration_events(placement, registration)

    assert [(e.type, e.seq, e.command_id) for e in events] == [
        (EventType.QUEUED, 1, placement.command_id),
        (EventType.COMMAND_REJECTED, 0, strangers.command_id),
        (EventType.CANCELLED, 2, cancel.command_id),
    ]
    assert events[0].data.model_dump(mode="json")["placed_by"] == GUEST.subject
    # published again after a crash, they are the same events
    again = registration_events(placement, registration)
    assert [e.event_id for e in again] == [e.event_id for e in events]


def test_a_rejection_says_why_and_explains_a_forbidden() -> None:
    approval = approve_order("o-1")
    unknown = rejection_event(approval, Outcome(OutcomeKind.REJECTED, UNKNOWN_ORDER))
    refused = rejection_event(approval, forbidden(NO_ROLE))

    assert unknown.data.model_dump(mode="json") == {"command_type": "ApproveOrder", "reason": UNKNOWN_ORDER}
    assert refused.data.model_dump(mode="json") == {
        "command_type": "ApproveOrder",
        "reason": FORBIDDEN,
        "detail": NO_ROLE,
    }


# --- who may send a command over AMQP ------------------------------------------------------------
@pytest.mark.parametrize(
    ("user_id", "claimed", "issuer"),
    [
        (None, None, NO_USER_ID),
        ("", GUEST, NO_USER_ID),
        ("gateway", None, Actor(subject="gateway", roles=frozenset({Role.OPERATOR}))),
        ("gateway", STRANGER, STRANGER),
        ("shop", None, Actor(subject="shop", roles=frozenset({Role.CUSTOMER}))),
        (
            "shop",
            Actor(subject="shop", roles=frozenset({Role.CUSTOMER})),
            Actor(subject="shop", roles=frozenset({Role.CUSTOMER})),
        ),
        ("shop", Actor(subject="shop", roles=frozenset({Role.OPERATOR})), NOT_A_DELEGATE),
        ("shop", STRANGER, NOT_A_DELEGATE),
        ("unknown", None, Actor(subject="unknown")),
    ],
)
def test_the_issuer_is_the_publishers_broker_user_or_whom_a_delegate_names(
    user_id: str | None, claimed: Actor | None, issuer: Actor | str
) -> None:
    identities = PublisherIdentities({"gateway": [Role.OPERATOR], "shop": [Role.CUSTOMER]}, ["gateway"])
    resolved = identities.issuer(user_id, claimed)
    assert resolved == (issuer if isinstance(issuer, Actor) else forbidden(issuer))


def test_an_issuer_without_the_role_may_not_send_the_command() -> None:
    identities = PublisherIdentities({"shop": [Role.CUSTOMER]}, [])
    assert identities.authorize("shop", place_order("o-1")) == forbidden(NOT_A_DELEGATE)  # names GUEST
    assert identities.authorize("shop", approve_order("o-1")) == forbidden(NOT_A_DELEGATE)
    shop = Actor(subject="shop", roles=frozenset({Role.CUSTOMER}))
    anonymous_approval = approve_order("o-1").model_copy(update={"issued_by": None})
    assert identities.authorize("shop", anonymous_approval) == forbidden(NO_ROLE)
    assert identities.authorize("shop", cancel_order("o-1").model_copy(update={"issued_by": None})) == shop


# --- which bodies are commands (the others are dead-lettered with the reason) ---------------------
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b'{"type": "ApproveOrder"}', "schema_invalid"),
        (approve_order("o-1").model_dump_json(exclude={"order_id"}).encode(), "schema_invalid"),
    ],
)
def test_a_body_that_is_no_command_is_refused_with_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as refused:
        parse_body(command_adapter.validate_json, body)
    assert refused.value.reason == reason


def test_the_placement_queue_takes_placements_only() -> None:
    placement = place_order("o-1")
    assert parse_body(PlaceOrder.model_validate_json, placement.model_dump_json().encode()) == placement
    with pytest.raises(InvalidMessage, match="PlaceOrder"):
        parse_body(PlaceOrder.model_validate_json, approve_order("o-1").model_dump_json().encode())


# --- failures and order --------------------------------------------------------------------------
def _db_error(sqlstate: str) -> DBAPIError:
    class Orig(Exception):
        pass

    orig = Orig("boom")
    orig.sqlstate = sqlstate  # type: ignore[attr-defined]
    return DBAPIError("SELECT 1", None, orig)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (RPCError("down", RPCStatusCode.UNAVAILABLE, b""), True),
        (RPCError("not found", RPCStatusCode.NOT_FOUND, b""), False),
        (ConnectionRefusedError("refused"), True),
        (_db_error("57P01"), True),  # admin shutdown
        (_db_error("08006"), True),  # connection failure
        (_db_error("P0001"), False),  # raised by a trigger
        (ValueError("bad"), False),
        (AdmissionInProgress("o-1"), True),
    ],
)
def test_transient_failures_are_told_apart(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


async def test_order_locks_are_granted_in_request_order_and_then_forgotten() -> None:
    locks = OrderLocks()
    granted: list[int] = []

    async def take(turn: int) -> None:
        async with locks.hold("order-1"):
            granted.append(turn)
            await asyncio.sleep(0)

    await asyncio.gather(*(take(turn) for turn in range(5)))
    assert granted == [0, 1, 2, 3, 4]
    assert len(locks) == 0

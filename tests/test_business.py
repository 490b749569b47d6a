"""The business functions against a freshly migrated PostgreSQL database, and the fault injector.

The business tests substitute `faults.flaky_call` with a no-op (the contract allows it in unit
tests): what is tested is the database work and its idempotency. The fault injector itself is
tested on its own at the end, as the contract specifies it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from services.workers import business_functions as business
from services.workers import faults
from services.workers.activities import BusinessActivities
from services.workers.activity_interface import ORDER_INVALID, ChargeOutcome, PaymentInput
from services.workers.business_functions import OrderInvalid, PaymentStatus, PaymentVoided
from services.workers.faults import (
    flaky_call,  # the real one, before any test substitutes it
)
from services.workers.steps import DEPENDENCY_UNAVAILABLE
from shared import db
from shared.contracts import (
    Address,
    OrderItem,
    OrderState,
    PlaceOrder,
)
from shared.db import Order, Payment, transaction
from shared.settings import Settings
from testsupport.orders import place_order, unique_id
from testsupport.polling import eventually
from testsupport.services import DownDatabase

Sessions = async_sessionmaker[AsyncSession]

ADDRESS = Address(
    name="Grace Hopper", line1="1 Compiler Way", city="Arlington", postal_code="22201", country="US"
)
NEW_ADDRESS = Address(
    name="Grace Hopper", line1="9 Navy Yard", city="Washington", postal_code="20374", country="US"
)
ITEMS = [
    OrderItem(sku="SKU-A", qty=2, unit_price_cents=700),
    OrderItem(sku="SKU-B", qty=1, unit_price_cents=600),
]


async def no_fault() -> None:
    return None


@pytest.fixture
def sessions(db_sessions: Sessions, monkeypatch: pytest.MonkeyPatch) -> Sessions:
    monkeypatch.setattr(faults, "flaky_call", no_fault)
    return db_sessions


def business_order(**order: Any) -> PlaceOrder:
    """A placement of this module's order (its own address and items), by nobody in particular."""
    return place_order(**{"items": ITEMS, "address": ADDRESS, "issued_by": None, **order})


async def received(sessions: Sessions, **order: Any) -> PlaceOrder:
    placed = business_order(**order)
    await business.order_received(sessions, placed)
    return placed


def payment_of(placed: PlaceOrder, order_id: str | None = None) -> PaymentInput:
    """The placement's payment, charged or refunded by its own order or by `order_id`."""
    payload = placed.payload
    return PaymentInput(
        order_id=order_id or placed.order_id, payment_id=payload.payment_id, amount_cents=payload.amount_cents
    )


async def charge(sessions: Sessions, placed: PlaceOrder, order_id: str | None = None) -> ChargeOutcome:
    return await business.payment_charged(sessions, payment_of(placed, order_id))


async def refund(sessions: Sessions, placed: PlaceOrder, order_id: str | None = None) -> bool:
    return await business.payment_refunded(sessions, payment_of(placed, order_id))


async def stored_order(sessions: Sessions, order_id: str) -> Order:
    async with sessions() as session:
        order = await session.get(Order, order_id)
    assert order is not None, f"order {order_id} is not stored"
    return order


async def stored_payments(sessions: Sessions, payment_id: str) -> list[Payment]:
    async with sessions() as session:
        return list(await session.scalars(select(Payment).where(col(Payment.payment_id) == payment_id)))


# --- order_received / order_validated ------------------------------------------------------------
async def test_order_received_inserts_the_order_once(sessions: Sessions) -> None:
    placed = await received(sessions)
    await business.order_received(sessions, placed)

    async with sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(Order).where(col(Order.id) == placed.order_id)
        )
    assert count == 1
    order = await stored_order(sessions, placed.order_id)
    assert order.state == OrderState.RECEIVED.value
    assert order.payment_id == placed.payload.payment_id
    assert order.amount_cents == 2 * 700 + 600
    assert order.items == [item.model_dump() for item in ITEMS]
    assert order.address == ADDRESS.model_dump()
    assert order.validated_at is None


async def test_order_validated_marks_the_order_once(sessions: Sessions) -> None:
    placed = await received(sessions)
    await business.order_validated(sessions, placed.order_id)
    first = (await stored_order(sessions, placed.order_id)).validated_at
    await business.order_validated(sessions, placed.order_id)

    assert first is not None
    assert (await stored_order(sessions, placed.order_id)).validated_at == first


@pytest.mark.parametrize(
    ("items", "complaint"),
    [
        ([OrderItem(sku="SKU-A", qty=1), OrderItem(sku="SKU-A", qty=2)], "repeated: SKU-A"),
        ([OrderItem(sku=f"SKU-{n}", qty=1_000) for n in range(11)], "exceeds"),
    ],
    ids=["repeated-sku", "too-many-pieces"],
)
async def test_order_validated_rejects_a_broken_rule(
    sessions: Sessions, items: list[OrderItem], complaint: str
) -> None:
    placed = await received(sessions, items=items)

    with pytest.raises(OrderInvalid, match=complaint):
        await business.order_validated(sessions, placed.order_id)
    assert (await stored_order(sessions, placed.order_id)).validated_at is None


async def test_order_validated_rejects_a_payment_owned_by_another_order(sessions: Sessions) -> None:
    first = await received(sessions)
    assert await charge(sessions, first) is ChargeOutcome.CHARGED
    second = await received(sessions, payment_id=first.payload.payment_id)

    with pytest.raises(OrderInvalid, match=f"belongs to order {first.order_id}"):
        await business.order_validated(sessions, second.order_id)


async def test_order_validated_of_a_missing_order_is_worth_retrying(sessions: Sessions) -> None:
    # not a business verdict (the insert may not be visible yet), so not OrderInvalid
    with pytest.raises(LookupError):
        await business.order_validated(sessions, unique_id("missing"))


# --- payment_charged / payment_refunded -----------------------------------------------------------
async def test_payment_charged_charges_once(sessions: Sessions) -> None:
    placed = await received(sessions)

    assert await charge(sessions, placed) is ChargeOutcome.CHARGED
    assert await charge(sessions, placed) is ChargeOutcome.ALREADY_CHARGED
    [payment] = await stored_payments(sessions, placed.payload.payment_id)
    assert (payment.order_id, payment.status) == (placed.order_id, PaymentStatus.CHARGED.value)
    assert payment.amount_cents == placed.payload.amount_cents


@asynccontextmanager
async def commit_held_back(
    sessions: Sessions, inserted: asyncio.Event, release: asyncio.Event
) -> AsyncIterator[AsyncSession]:
    """`transaction` whose first use stops after its work, before committing, until released."""
    async with transaction(sessions) as session:
        yield session
        if not inserted.is_set():
            inserted.set()
            await release.wait()


async def other_backends_waiting_on_a_lock(sessions: Sessions) -> int:
    async with sessions() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return int(waiting or 0)


async def behind_a_held_charge(
    sessions: Sessions,
    monkeypatch: pytest.MonkeyPatch,
    placed: PlaceOrder,
    then: Awaitable[Any],
    waiting_for: str,
) -> tuple[Any, Any]:
    """A charge claims the payment id and holds its transaction open; `then` must wait on that
    claim (we see it waiting in pg_stat_activity) until the charge commits. Both results."""
    inserted, release = asyncio.Event(), asyncio.Event()
    monkeypatch.setattr(business, "transaction", lambda factory: commit_held_back(factory, inserted, release))

    held = asyncio.create_task(charge(sessions, placed))
    try:
        await asyncio.wait_for(inserted.wait(), 5)
        behind = asyncio.ensure_future(then)

        async def behind_is_blocked() -> bool:
            return await other_backends_waiting_on_a_lock(sessions) >= 1

        await eventually(behind_is_blocked, what=waiting_for)
        assert not behind.done()
    finally:
        release.set()  # never leave the first transaction open, whatever happened
    held_result, behind_result = await asyncio.wait_for(asyncio.gather(held, behind), 5)
    return held_result, behind_result


async def test_concurrent_charges_of_one_payment_charge_once(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    placed = await received(sessions)
    outcomes = await behind_a_held_charge(
        sessions,
        monkeypatch,
        placed,
        charge(sessions, placed),
        "the second charge to wait on the first one's claim",
    )

    assert outcomes == (ChargeOutcome.CHARGED, ChargeOutcome.ALREADY_CHARGED)
    assert len(await stored_payments(sessions, placed.payload.payment_id)) == 1


async def test_many_concurrent_charges_of_one_payment_charge_once(sessions: Sessions) -> None:
    placed = await received(sessions)

    outcomes = await asyncio.gather(*(charge(sessions, placed) for _ in range(8)))

    assert sorted(outcomes) == [ChargeOutcome.ALREADY_CHARGED] * 7 + [ChargeOutcome.CHARGED]
    assert len(await stored_payments(sessions, placed.payload.payment_id)) == 1


async def test_payment_charged_for_a_payment_owned_by_another_order_is_invalid(sessions: Sessions) -> None:
    first = await received(sessions)
    await charge(sessions, first)

    with pytest.raises(OrderInvalid, match=f"belongs to order {first.order_id}"):
        await charge(sessions, first, order_id=unique_id("other-order"))
    [payment] = await stored_payments(sessions, first.payload.payment_id)
    assert payment.order_id == first.order_id


async def test_payment_refunded_refunds_once(sessions: Sessions) -> None:
    placed = await received(sessions)
    await charge(sessions, placed)
    payment_id = placed.payload.payment_id

    assert await refund(sessions, placed) is True
    [refunded] = await stored_payments(sessions, payment_id)
    assert refunded.status == PaymentStatus.REFUNDED.value and refunded.refunded_at is not None
    assert await refund(sessions, placed) is True
    [again] = await stored_payments(sessions, payment_id)
    assert again.refunded_at == refunded.refunded_at


async def test_a_refund_before_any_charge_voids_the_payment_so_a_late_attempt_cannot_charge(
    sessions: Sessions,
) -> None:
    # the order stopped while a charge attempt was still on its way (in flaky_call, say): the
    # refund finds nothing charged, and the attempt that arrives afterwards must not charge
    placed = await received(sessions)
    payment_id = placed.payload.payment_id

    assert await refund(sessions, placed) is False
    with pytest.raises(PaymentVoided, match="voided"):
        await charge(sessions, placed)

    [payment] = await stored_payments(sessions, payment_id)
    assert payment.status == PaymentStatus.VOIDED.value
    assert payment.charged_at is None and payment.voided_at is not None
    assert await refund(sessions, placed) is False  # refunding again changes nothing


async def test_an_abandoned_charge_that_commits_after_the_refund_began_is_refunded(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the abandoned attempt's charge commits while the refund waits on its claim: it is refunded
    placed = await received(sessions)
    charged, refunded = await behind_a_held_charge(
        sessions, monkeypatch, placed, refund(sessions, placed), "the refund to wait on the charge's claim"
    )

    assert (charged, refunded) == (ChargeOutcome.CHARGED, True)
    [payment] = await stored_payments(sessions, placed.payload.payment_id)
    assert payment.status == PaymentStatus.REFUNDED.value


async def test_a_refund_never_touches_another_orders_payment(sessions: Sessions) -> None:
    first = await received(sessions)
    await charge(sessions, first)

    assert await refund(sessions, first, order_id=unique_id("other-order")) is False
    [payment] = await stored_payments(sessions, first.payload.payment_id)
    assert (payment.order_id, payment.status) == (first.order_id, PaymentStatus.CHARGED.value)


# --- shipping -------------------------------------------------------------------------------------
async def test_carrier_dispatched_keeps_its_tracking_number_and_takes_the_new_address(
    sessions: Sessions,
) -> None:
    placed = await received(sessions)

    tracking_number = await business.carrier_dispatched(sessions, placed.order_id, ADDRESS)
    first = await stored_order(sessions, placed.order_id)
    again = await business.carrier_dispatched(sessions, placed.order_id, NEW_ADDRESS)
    second = await stored_order(sessions, placed.order_id)

    assert tracking_number.startswith("TRK-")
    assert again == tracking_number
    assert (first.tracking_number, first.address) == (tracking_number, ADDRESS.model_dump())
    assert (second.tracking_number, second.address) == (tracking_number, NEW_ADDRESS.model_dump())
    assert first.dispatched_at is not None and second.dispatched_at == first.dispatched_at


async def test_carrier_dispatched_for_a_missing_order_is_worth_retrying(sessions: Sessions) -> None:
    with pytest.raises(LookupError):
        await business.carrier_dispatched(sessions, unique_id("missing"), ADDRESS)


@pytest.mark.parametrize(
    ("mark", "column"),
    [(business.package_prepared, "package_prepared_at"), (business.order_shipped, "shipped_at")],
    ids=["package_prepared", "order_shipped"],
)
async def test_step_timestamps_are_set_once(
    sessions: Sessions, mark: Callable[[Sessions, str], Awaitable[None]], column: str
) -> None:
    placed = await received(sessions)

    await mark(sessions, placed.order_id)
    first = getattr(await stored_order(sessions, placed.order_id), column)
    await mark(sessions, placed.order_id)

    assert first is not None
    assert getattr(await stored_order(sessions, placed.order_id), column) == first


# --- the fault injector ---------------------------------------------------------------------------
async def failing_fault() -> None:
    raise RuntimeError("Forced failure for testing")


BusinessStep = Callable[[Sessions, PlaceOrder], Awaitable[Any]]
BUSINESS_STEPS: dict[str, BusinessStep] = {
    "order_received": business.order_received,
    "order_validated": lambda sessions, placed: business.order_validated(sessions, placed.order_id),
    "payment_charged": charge,
    "package_prepared": lambda sessions, placed: business.package_prepared(sessions, placed.order_id),
    "carrier_dispatched": lambda sessions, placed: business.carrier_dispatched(
        sessions, placed.order_id, NEW_ADDRESS
    ),
    "order_shipped": lambda sessions, placed: business.order_shipped(sessions, placed.order_id),
}


async def order_snapshot(sessions: Sessions, order_id: str) -> dict[str, Any] | None:
    async with sessions() as session:
        order = await session.get(Order, order_id)
    return order.model_dump() if order else None


@pytest.mark.parametrize("step", BUSINESS_STEPS.values(), ids=BUSINESS_STEPS.keys())
async def test_each_business_step_calls_the_fault_injector_first(
    db_sessions: Sessions, monkeypatch: pytest.MonkeyPatch, step: BusinessStep
) -> None:
    placed = business_order()
    if step is not business.order_received:
        monkeypatch.setattr(faults, "flaky_call", no_fault)
        await business.order_received(db_sessions, placed)
    before = await order_snapshot(db_sessions, placed.order_id)
    monkeypatch.setattr(faults, "flaky_call", failing_fault)

    with pytest.raises(RuntimeError, match="Forced failure for testing"):
        await step(db_sessions, placed)

    # the failure came before any database work
    assert await order_snapshot(db_sessions, placed.order_id) == before
    assert await stored_payments(db_sessions, placed.payload.payment_id) == []


async def statements_sent(sessions: Sessions, work: Awaitable[Any]) -> list[str]:
    """The SQL statements that `work` sends through the sessions' engine (BEGIN and COMMIT aside)."""
    engine = sessions.kw["bind"].sync_engine
    sent: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *rest: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        await work
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return sent


async def statements_per_step(sessions: Sessions, placed: PlaceOrder) -> dict[str, int]:
    return {
        name: len(await statements_sent(sessions, step(sessions, placed)))
        for name, step in BUSINESS_STEPS.items()
    }


async def test_each_business_step_attempt_is_one_statement_but_a_first_validation(sessions: Sessions) -> None:
    placed = business_order()
    first = await statements_per_step(sessions, placed)
    again = await statements_per_step(sessions, placed)

    one_each = dict.fromkeys(BUSINESS_STEPS, 1)
    # validation reads the order with its payment's holder, then stamps it; once stamped, it only reads
    assert first == {**one_each, "order_validated": 2}
    # a charge that finds the payment claimed reads the claim
    assert again == {**one_each, "payment_charged": 2}


@pytest.mark.parametrize("draw", [0.0, 0.1, 0.3299])
async def test_flaky_call_fails_a_third_of_the_time(monkeypatch: pytest.MonkeyPatch, draw: float) -> None:
    monkeypatch.setattr(random, "random", lambda: draw)

    with pytest.raises(RuntimeError, match=r"^Forced failure for testing$"):
        await flaky_call()


@pytest.mark.parametrize("draw", [0.33, 0.5, 0.6699])
async def test_flaky_call_hangs_a_third_of_the_time(monkeypatch: pytest.MonkeyPatch, draw: float) -> None:
    monkeypatch.setattr(random, "random", lambda: draw)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(flaky_call(), 0.2)


@pytest.mark.parametrize("draw", [0.67, 0.9, 0.9999])
async def test_flaky_call_passes_a_third_of_the_time(monkeypatch: pytest.MonkeyPatch, draw: float) -> None:
    monkeypatch.setattr(random, "random", lambda: draw)

    await asyncio.wait_for(flaky_call(), 1)


# --- how the activities report failures -----------------------------------------------------------
async def test_a_database_outage_is_reported_as_such_and_a_broken_rule_for_good(
    sessions: Sessions, base_settings: Settings
) -> None:
    placed = await received(sessions)
    async with DownDatabase() as down:
        engine = db.create_engine(down.settings_for(base_settings))
        try:
            unreachable = BusinessActivities(db.session_factory(engine), None, None, None, None)  # type: ignore[arg-type]
            with pytest.raises(ApplicationError) as outage:
                await unreachable.receive_order(placed)
        finally:
            await engine.dispose()
    assert (outage.value.type, outage.value.non_retryable) == (DEPENDENCY_UNAVAILABLE, False)

    reused = placed.model_copy(update={"order_id": unique_id("other-order")})
    await business.order_received(sessions, reused)
    await charge(sessions, placed)
    reachable = BusinessActivities(sessions, None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(ApplicationError) as broken:
        await reachable.validate_order(reused.order_id)
    assert (broken.value.type, broken.value.non_retryable) == (ORDER_INVALID, True)


async def test_a_local_publish_hands_its_batch_over_at_once_while_the_broker_is_away() -> None:
    # a local activity holds its workflow task open: it must not wait for the broker to return
    away = SimpleNamespace(connected=asyncio.Event())  # never set: the connection is down
    activities = BusinessActivities(None, None, away, None, None)  # type: ignore[arg-type]
    local = ActivityEnvironment()
    local.info = dataclasses.replace(local.info, is_local=True)
    with pytest.raises(ApplicationError) as handed_over:
        await asyncio.wait_for(local.run(activities.publish_events, []), 1)
    assert (handed_over.value.type, handed_over.value.non_retryable) == (DEPENDENCY_UNAVAILABLE, True)
    # the regular activity it falls back to waits for the broker instead (nothing to send here)
    await ActivityEnvironment().run(activities.publish_events, [])

"""The bridge's admission ledger against real PostgreSQL: what its merged transactions and
statements must never get wrong (half-done work after a crash, a command applied twice, a slot
taken twice). On a database of its own, since slots are counted across the whole table."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlmodel import col

from devstack.stack import isolated_settings
from services.audit.projection import record_events
from services.bridge.admission_gate import (
    ALREADY_PROCESSED,
    CANCELLED_BEFORE_ADMISSION,
    PLACED_BY_ANOTHER,
    WAITING_FOR_PLACEMENT,
    AdmissionLedger,
    Registration,
    Signal,
    Slot,
)
from services.bridge.consumer import registration_events
from services.bridge.lifecycles import ACCEPTED, Outcome, OutcomeKind
from shared import db, schema
from shared.admission_table import AdmissionSlots, AdmissionStatus
from shared.authorization import FORBIDDEN
from shared.contracts import Actor, CancelOrder, CancelOrderPayload, Command, OrderState, Role
from shared.db import Admission, Order, ProcessedCommand, transaction
from shared.settings import Settings
from testsupport.orders import GUEST, approve_order, cancel_order, place_order, unique_id
from testsupport.session import session_name

Sessions = async_sessionmaker[AsyncSession]
LEDGER_DATABASE = session_name("orderflow_test_ledger")


class Crash(Exception):
    """The bridge died here."""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ledger_settings() -> Settings:
    settings = isolated_settings(Settings(log_json=True), LEDGER_DATABASE)
    await schema.drop_database(settings.database_url)
    await schema.ensure_database(settings.database_url)
    await asyncio.to_thread(schema.upgrade, settings.database_url)
    return settings


@pytest_asyncio.fixture(loop_scope="session")
async def engine(ledger_settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(ledger_settings)
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE admissions, orders, processed_commands, order_events"))
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def sessions_of(engine: AsyncEngine) -> Sessions:
    return db.session_factory(engine)


async def nothing(_: Registration) -> None:
    return None


async def crash(_: Registration) -> None:
    raise Crash


async def status_of(engine: AsyncEngine, order_id: str) -> str | None:
    async with engine.connect() as connection:
        return await connection.scalar(
            select(col(Admission.status)).where(col(Admission.order_id) == order_id)
        )


async def recorded(engine: AsyncEngine, command: Command) -> str | None:
    async with engine.connect() as connection:
        return await connection.scalar(
            select(col(ProcessedCommand.outcome)).where(
                col(ProcessedCommand.command_id) == command.command_id
            )
        )


async def listed(engine: AsyncEngine, order_id: str) -> tuple[str, int, str | None] | None:
    """The order's row in the read model: its state, last event's seq and reason."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(col(Order.state), col(Order.last_event_seq), col(Order.reason)).where(
                    col(Order.id) == order_id
                )
            )
        ).first()
    return None if row is None else (row.state, row.last_event_seq, row.reason)


async def holding_slots(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        held = await connection.scalar(
            select(func.count()).where(col(Admission.status).in_(["admitting", "running"]))
        )
    return held or 0


@pytest.mark.parametrize("take_free_slot", [False, True])
async def test_a_crash_before_registering_commits_leaves_nothing_half_done(
    engine: AsyncEngine, take_free_slot: bool
) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    with pytest.raises(Crash):
        await ledger.register(placement, crash, take_free_slot)
    assert await status_of(engine, placement.order_id) is None
    assert await listed(engine, placement.order_id) is None
    assert await holding_slots(engine) == 0

    published: list[Registration] = []

    async def publish(registration: Registration) -> None:
        published.append(registration)

    registration = await ledger.register(placement, publish, take_free_slot)
    assert isinstance(registration, Registration)
    assert len(published) == 1  # the events again, with the same ids, now that they commit
    assert (registration.slot is not None) is take_free_slot
    assert await listed(engine, placement.order_id) == (OrderState.QUEUED.value, 1, None)


async def test_a_placement_delivered_again_publishes_nothing_new_and_after_its_record_is_processed(
    engine: AsyncEngine,
) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    first = await ledger.register(placement, nothing, take_free_slot=True)
    assert isinstance(first, Registration) and first.slot is not None

    # delivered again before its outcome was recorded: its slot is its own, taken once
    again = await ledger.register(placement, crash, take_free_slot=True)
    assert isinstance(again, Registration)
    assert again.slot == first.slot and again.queued_at == first.queued_at
    assert await holding_slots(engine) == 1

    await ledger.settle_start(placement, ACCEPTED)
    assert (await status_of(engine, placement.order_id), await recorded(engine, placement)) == (
        "running",
        "accepted",
    )
    assert await ledger.register(placement, crash, take_free_slot=True) is ALREADY_PROCESSED
    other = place_order(placement.order_id)
    assert await ledger.register(other, crash, take_free_slot=True) is PLACED_BY_ANOTHER


async def test_a_lifecycle_that_did_not_start_gives_its_slot_back_with_the_record(
    engine: AsyncEngine,
) -> None:
    ledger = AdmissionLedger(engine, max_running=1)
    placement = place_order(unique_id("ord"))
    await ledger.register(placement, nothing, take_free_slot=True)
    await ledger.settle_start(placement, Outcome(OutcomeKind.REJECTED, "order already exists"))
    assert (await status_of(engine, placement.order_id), await recorded(engine, placement)) == (
        "ended",
        "rejected",
    )
    assert await holding_slots(engine) == 0


async def test_a_command_is_processed_once(engine: AsyncEngine) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    await ledger.register(placement, nothing, take_free_slot=True)
    await ledger.settle_start(placement, ACCEPTED)
    approval = approve_order(placement.order_id)

    async def no_cancel() -> None:
        raise AssertionError("not a cancel")

    assert await ledger.steer(approval, no_cancel) is Signal.STARTED
    await ledger.record(approval, ACCEPTED)
    assert await ledger.steer(approval, no_cancel) is ALREADY_PROCESSED


async def test_commands_that_overtook_the_placement_start_with_it(engine: AsyncEngine) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    approval = approve_order(placement.order_id)
    assert await ledger.park(approval)
    registration = await ledger.register(placement, nothing, take_free_slot=True)
    assert isinstance(registration, Registration) and registration.slot is not None
    assert registration.slot.early_commands == [approval]


async def test_a_cancel_for_a_waiting_order_ends_it_once(engine: AsyncEngine) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    await ledger.register(placement, nothing, take_free_slot=False)
    cancellation = cancel_order(placement.order_id)
    published: list[str] = []

    async def publish_cancelled() -> None:
        published.append("cancelled")

    assert await ledger.steer(cancellation, publish_cancelled) is CANCELLED_BEFORE_ADMISSION
    assert await ledger.steer(cancellation, publish_cancelled) is CANCELLED_BEFORE_ADMISSION
    assert published == ["cancelled"]
    assert await ledger.take_slot(placement.order_id) is AdmissionStatus.CANCELLED


async def test_a_waiting_order_takes_only_the_commands_its_placer_allows(engine: AsyncEngine) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    await ledger.register(placement, nothing, take_free_slot=False)
    stranger = Actor(subject="stranger", roles=frozenset({Role.CUSTOMER}))
    by_stranger = cancel_order(placement.order_id).model_copy(update={"issued_by": stranger})
    own_approval = approve_order(placement.order_id).model_copy(update={"issued_by": GUEST})

    async def no_cancel() -> None:
        raise AssertionError("the order must not end")

    refused = [await ledger.steer(command, no_cancel) for command in (by_stranger, own_approval)]
    assert [(outcome.kind, outcome.detail) for outcome in refused if isinstance(outcome, Outcome)] == [
        (OutcomeKind.REJECTED, FORBIDDEN)
    ] * 2
    assert await status_of(engine, placement.order_id) == AdmissionStatus.WAITING.value


async def test_parked_commands_the_placer_does_not_allow_are_refused_as_it_registers(
    engine: AsyncEngine,
) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    stranger = Actor(subject="stranger", roles=frozenset({Role.CUSTOMER}))
    by_stranger = cancel_order(placement.order_id).model_copy(update={"issued_by": stranger})
    approval = approve_order(placement.order_id)
    for command in (by_stranger, approval):
        assert (
            await ledger.park(command)
            or await ledger.steer(command, nothing_to_publish) is WAITING_FOR_PLACEMENT
        )
        await ledger.record(command, ACCEPTED)
    registration = await ledger.register(placement, nothing, take_free_slot=True)

    assert isinstance(registration, Registration) and registration.slot is not None
    assert registration.cancel is None  # the stranger's cancel did not end it
    assert [(command, outcome.detail) for command, outcome in registration.refused] == [
        (by_stranger, FORBIDDEN)
    ]
    assert registration.slot.early_commands == [approval]
    assert await recorded(engine, by_stranger) == OutcomeKind.REJECTED.value


async def nothing_to_publish() -> None:
    return None


@pytest.mark.parametrize("parked_cancel", [False, True], ids=["queued", "cancelled_by_a_parked_cancel"])
async def test_an_order_whose_events_are_recorded_before_its_row_commits_ends_at_the_last_one(
    engine: AsyncEngine, sessions_of: Sessions, parked_cancel: bool
) -> None:
    """The audit consumer may record a registration's events while it is still uncommitted: their
    projection finds no row, so the row itself must say what they do."""
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    reason = CancelOrderPayload(reason="changed my mind")
    cancellation = cancel_order(placement.order_id).model_copy(update={"payload": reason})
    if parked_cancel:
        assert await ledger.park(cancellation)

    async def recorded_at_once(registration: Registration) -> None:
        async with transaction(sessions_of) as session:
            await record_events(session, registration_events(placement, registration))

    registration = await ledger.register(placement, recorded_at_once, take_free_slot=False)

    assert isinstance(registration, Registration)
    assert isinstance(registration.cancel, CancelOrder) is parked_cancel
    expected = (OrderState.CANCELLED.value, 2, "changed my mind") if parked_cancel else ("queued", 1, None)
    assert await listed(engine, placement.order_id) == expected


async def test_two_bridges_racing_for_the_last_slot_take_it_once(
    engine: AsyncEngine, ledger_settings: Settings
) -> None:
    other_engine = db.create_engine(ledger_settings)  # another bridge: a pool of its own
    try:
        ledgers = [AdmissionLedger(engine, max_running=1), AdmissionLedger(other_engine, max_running=1)]
        waiting = [place_order(unique_id("ord")) for _ in ledgers]
        for ledger, placement in zip(ledgers, waiting, strict=True):
            await ledger.register(placement, nothing, take_free_slot=False)
        taken = await asyncio.gather(
            *(ledger.take_slot(p.order_id) for ledger, p in zip(ledgers, waiting, strict=True))
        )
        assert sorted(isinstance(slot, Slot) for slot in taken) == [False, True]
        assert AdmissionStatus.WAITING in taken

        # and two placements that register at once, each asking for a free slot as it does
        await asyncio.gather(
            *(ledger.settle_start(p, ACCEPTED) for ledger, p in zip(ledgers, waiting, strict=True))
        )
        arriving = [place_order(unique_id("ord")) for _ in ledgers]
        registrations = await asyncio.gather(
            *(
                ledger.register(p, nothing, take_free_slot=True)
                for ledger, p in zip(ledgers, arriving, strict=True)
            )
        )
        assert all(isinstance(r, Registration) and r.status is AdmissionStatus.WAITING for r in registrations)
        assert await holding_slots(engine) == 1
    finally:
        await other_engine.dispose()


async def test_racing_registrations_share_the_free_slots_without_exceeding_them(
    engine: AsyncEngine, ledger_settings: Settings
) -> None:
    other_engine = db.create_engine(ledger_settings)
    try:
        ledgers = [AdmissionLedger(engine, max_running=3), AdmissionLedger(other_engine, max_running=3)]
        placements = [place_order(unique_id("ord")) for _ in range(12)]
        registrations = await asyncio.gather(
            *(ledgers[i % 2].register(p, nothing, take_free_slot=True) for i, p in enumerate(placements))
        )
        admitted = [r for r in registrations if isinstance(r, Registration) and r.slot is not None]
        assert len(admitted) == 3
        assert await holding_slots(engine) == 3
    finally:
        await other_engine.dispose()


# --- the slot while the order is in review (shared/admission_table.py, the workers' side) ------------
OneSlot = tuple[AdmissionLedger, AdmissionSlots]


@pytest.fixture
def one_slot(engine: AsyncEngine, sessions_of: Sessions) -> OneSlot:
    """The bridge's ledger and the workers' slots over one slot."""
    return AdmissionLedger(engine, max_running=1), AdmissionSlots(sessions_of, max_running=1)


async def running_order(ledger: AdmissionLedger) -> str:
    placement = place_order(unique_id("ord"))
    registration = await ledger.register(placement, nothing, take_free_slot=True)
    assert isinstance(registration, Registration) and registration.slot is not None
    await ledger.settle_start(placement, ACCEPTED)
    return placement.order_id


async def in_review(ledger: AdmissionLedger, slots: AdmissionSlots) -> str:
    """A running order that gave its slot back for its review."""
    order_id = await running_order(ledger)
    await slots.leave_for_review(order_id)
    return order_id


async def waiting_order(ledger: AdmissionLedger) -> str:
    placement = place_order(unique_id("ord"))
    registration = await ledger.register(placement, nothing, take_free_slot=True)
    assert isinstance(registration, Registration) and registration.slot is None
    return placement.order_id


async def test_an_order_in_review_gives_its_slot_to_a_waiting_placement(
    engine: AsyncEngine, one_slot: OneSlot
) -> None:
    ledger, slots = one_slot
    reviewed = await running_order(ledger)
    placed = await waiting_order(ledger)

    assert await slots.leave_for_review(reviewed) is None  # no approved order waits for it
    assert await status_of(engine, reviewed) == "reviewing"
    assert isinstance(await ledger.take_slot(placed), Slot)
    assert await slots.leave_for_review(reviewed) is None  # asked again: nothing changes
    assert await holding_slots(engine) == 1


async def test_an_approved_order_goes_on_before_any_waiting_placement(
    engine: AsyncEngine, one_slot: OneSlot
) -> None:
    ledger, slots = one_slot
    reviewed = await in_review(ledger, slots)
    running = await running_order(ledger)  # took the slot given back
    placed = await waiting_order(ledger)

    assert await slots.resume(reviewed) is False  # no slot free: it waits, first in line
    assert await status_of(engine, reviewed) == "resuming"
    assert await slots.release(running) == reviewed  # the freed slot goes to it, not the placement
    assert await ledger.take_slot(placed) is AdmissionStatus.WAITING
    assert await status_of(engine, reviewed) == "running"
    assert await slots.resume(reviewed) is True  # woken, it finds the slot its own

    assert await slots.release(reviewed) is None
    assert isinstance(await ledger.take_slot(placed), Slot)


async def test_approved_orders_get_the_freed_slots_in_the_order_they_asked(
    engine: AsyncEngine, one_slot: OneSlot
) -> None:
    ledger, slots = one_slot
    first, second = await running_order(ledger), await waiting_order(ledger)
    await slots.leave_for_review(first)
    assert isinstance(await ledger.take_slot(second), Slot)
    await ledger.settle_start(place_order(second), ACCEPTED)
    await slots.leave_for_review(second)
    running = await running_order(ledger)

    assert await slots.resume(first) is False
    assert await slots.resume(second) is False
    assert await slots.resume(second) is False  # asking again keeps its place behind the first
    assert await slots.release(running) == first
    assert await slots.resume(second) is False
    assert await slots.release(first) == second
    assert await slots.release(second) is None


async def test_an_order_ended_in_review_or_in_line_holds_nothing_any_more(
    engine: AsyncEngine, one_slot: OneSlot
) -> None:
    ledger, slots = one_slot
    reviewed, in_line = await in_review(ledger, slots), await in_review(ledger, slots)
    running = await running_order(ledger)
    assert await slots.resume(in_line) is False

    assert await slots.release(reviewed) is None  # cancelled in review: nobody was waiting on it
    assert await slots.release(in_line) is None  # cancelled in line: the slot stays taken
    assert (await status_of(engine, reviewed), await status_of(engine, in_line)) == ("ended", "ended")
    assert await slots.release(running) is None
    assert await holding_slots(engine) == 0


async def test_an_order_the_bridge_never_admitted_goes_on_without_a_slot(sessions_of: Sessions) -> None:
    # started through Temporal by hand, say: no admission row, nothing to give back or take
    slots = AdmissionSlots(sessions_of, max_running=1)
    order_id = unique_id("ord")
    assert await slots.leave_for_review(order_id) is None
    assert await slots.resume(order_id) is True
    assert await slots.release(order_id) is None

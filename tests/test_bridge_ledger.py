"""The bridge's admission ledger against real PostgreSQL: what its merged transactions and
statements must never get wrong (half-done work after a crash, a command applied twice, a slot
taken twice). On a database of its own, since slots are counted across the whole table."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from api_support import unique_id
from services.bridge.admission import (
    AdmissionLedger,
    NotRegistered,
    Registration,
    Slot,
    Steering,
)
from services.bridge.lifecycles import ACCEPTED, Outcome, OutcomeKind
from services.stack import isolated_settings
from shared import db, schema
from shared.admissions import AdmissionStatus
from shared.contracts import PlaceOrder
from shared.db import Admission, Order, ProcessedCommand
from shared.settings import Settings
from test_bridge import approve, cancel, place_order

LEDGER_DATABASE = "orderflow_test_ledger" + os.environ.get("ORDERFLOW_TEST_ID", "")


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
        await connection.execute(text("TRUNCATE admissions, orders, processed_commands"))
    yield engine
    await engine.dispose()


async def nothing(_: Registration) -> None:
    return None


async def crash(_: Registration) -> None:
    raise Crash


async def status_of(engine: AsyncEngine, order_id: str) -> str | None:
    async with engine.connect() as connection:
        return await connection.scalar(
            select(col(Admission.status)).where(col(Admission.order_id) == order_id)
        )


async def recorded(engine: AsyncEngine, command: PlaceOrder) -> str | None:
    async with engine.connect() as connection:
        return await connection.scalar(
            select(col(ProcessedCommand.outcome)).where(
                col(ProcessedCommand.command_id) == command.command_id
            )
        )


async def listed(engine: AsyncEngine, order_id: str) -> bool:
    async with engine.connect() as connection:
        found = await connection.scalar(select(func.count()).where(col(Order.id) == order_id))
    return bool(found)


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
    assert not await listed(engine, placement.order_id)
    assert await holding_slots(engine) == 0

    published: list[Registration] = []

    async def publish(registration: Registration) -> None:
        published.append(registration)

    registration = await ledger.register(placement, publish, take_free_slot)
    assert isinstance(registration, Registration)
    assert len(published) == 1  # the events again, with the same ids, now that they commit
    assert (registration.slot is not None) is take_free_slot
    assert await listed(engine, placement.order_id)


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

    await ledger.started(placement, ACCEPTED)
    assert (await status_of(engine, placement.order_id), await recorded(engine, placement)) == (
        "running",
        "accepted",
    )
    assert await ledger.register(placement, crash, take_free_slot=True) is NotRegistered.PROCESSED
    other = place_order(placement.order_id)
    assert await ledger.register(other, crash, take_free_slot=True) is NotRegistered.PLACED_BY_ANOTHER


async def test_a_lifecycle_that_did_not_start_gives_its_slot_back_with_the_record(
    engine: AsyncEngine,
) -> None:
    ledger = AdmissionLedger(engine, max_running=1)
    placement = place_order(unique_id("ord"))
    await ledger.register(placement, nothing, take_free_slot=True)
    await ledger.not_started(placement, Outcome(OutcomeKind.REJECTED, "order already exists"))
    assert (await status_of(engine, placement.order_id), await recorded(engine, placement)) == (
        "ended",
        "rejected",
    )
    assert await holding_slots(engine) == 0


async def test_a_command_is_processed_once(engine: AsyncEngine) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    await ledger.register(placement, nothing, take_free_slot=True)
    await ledger.started(placement, ACCEPTED)
    approval = approve(placement.order_id)

    async def no_cancel() -> None:
        raise AssertionError("not a cancel")

    assert await ledger.steer(approval, no_cancel) is Steering.SIGNAL
    await ledger.record(approval, ACCEPTED)
    assert await ledger.steer(approval, no_cancel) is Steering.PROCESSED


async def test_commands_that_overtook_the_placement_start_with_it(engine: AsyncEngine) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    approval = approve(placement.order_id)
    assert await ledger.park(approval)
    registration = await ledger.register(placement, nothing, take_free_slot=True)
    assert isinstance(registration, Registration) and registration.slot is not None
    assert registration.slot.early_commands == [approval]


async def test_a_cancel_for_a_waiting_order_ends_it_once(engine: AsyncEngine) -> None:
    ledger = AdmissionLedger(engine, max_running=5)
    placement = place_order(unique_id("ord"))
    await ledger.register(placement, nothing, take_free_slot=False)
    cancellation = cancel(placement.order_id)
    published: list[str] = []

    async def publish_cancelled() -> None:
        published.append("cancelled")

    assert await ledger.steer(cancellation, publish_cancelled) is Steering.CANCELLED_WAITING
    assert await ledger.steer(cancellation, publish_cancelled) is Steering.CANCELLED_WAITING
    assert published == ["cancelled"]
    assert await ledger.take_slot(placement.order_id) is AdmissionStatus.CANCELLED


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
            *(ledger.started(p, ACCEPTED) for ledger, p in zip(ledgers, waiting, strict=True))
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

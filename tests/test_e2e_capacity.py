"""End to end, scaled out and above the admission bound: two bridges, two workers (workflows in
the sandbox), at most three lifecycles at once, the real fault injector and the shipped timings
(300 s review window, 14 s deadline). Every order ends within the 15 s promise as the contract
counts it: from its admission, the review and the wait for a slot after the approval aside.

The admission bound is global per database, so this module runs on a database and vhost of its own.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractQueue
from sqlalchemy import func, select
from sqlmodel import col

from devstack.stack import free_port, running_stack
from shared import broker, db, schema
from shared.admission_table import AdmissionStatus
from shared.contracts import EventType, OrderEvent, Role
from shared.db import Admission
from shared.settings import Settings
from testsupport.amqp import moved_to
from testsupport.gateway import bearer
from testsupport.orders import approve_order, cancel_order, place_order, unique_id
from testsupport.session import session_name
from testsupport.system import EventLog, place_over_http

pytestmark = pytest.mark.e2e

CAPACITY_DATABASE = session_name("orderflow_test_capacity")
ORDERS = 40
MAX_RUNNING = 3
PROMISE_SECONDS = 15.0
HOLDING_SLOT = [status for status in AdmissionStatus if status.holds_slot]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(settings: Settings) -> AsyncIterator[Settings]:
    port = free_port()
    scaled = moved_to(settings, CAPACITY_DATABASE).model_copy(
        update={
            "temporal_address": settings.temporal_address,
            "api_port": port,
            "api_url": f"http://127.0.0.1:{port}",
            "bridge_instances": 2,
            "worker_instances": 2,
            "max_running_lifecycles": MAX_RUNNING,
            # production's runner is unsandboxed (tests/test_e2e.py); the sandboxed option runs here
            "workflow_sandbox": True,
        }
    )
    await schema.drop_database(scaled.database_url)
    with tempfile.NamedTemporaryFile(
        "w+", prefix="orderflow-e2e-capacity-", suffix=".log", delete=False
    ) as log:
        try:
            async with running_stack(scaled, temporal=None, log=log):
                yield scaled
        finally:
            print(f"service logs: {log.name}")


async def test_a_burst_above_the_bound_all_ends_as_its_commands_say(
    system: Settings,
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
) -> None:
    topology, events, _ = amqp
    order_ids = [unique_id("cap") for _ in range(ORDERS)]
    to_cancel = set(order_ids[::8])
    customer = bearer(system, "capacity-customer", Role.CUSTOMER)
    async with httpx.AsyncClient(base_url=system.api_url, timeout=10, headers=customer) as api:
        for index, order_id in enumerate(order_ids):
            # half over HTTP, half over AMQP; each followed at once by its approval or cancel
            if index % 2:
                await place_over_http(api, order_id)
            else:
                await broker.publish_command(topology, place_order(order_id))
            follow_up = cancel_order(order_id) if order_id in to_cancel else approve_order(order_id)
            await broker.publish_command(topology, follow_up)

    endings = await asyncio.gather(*(events.wait_for_end(order_id) for order_id in order_ids))

    for order_id, ending in zip(order_ids, endings, strict=True):
        expected = EventType.CANCELLED if order_id in to_cancel else EventType.COMPLETED
        assert ending.type is expected, (order_id, ending)
        trail = events.by_order[order_id]
        assert [e.seq for e in sorted(trail, key=lambda e: e.seq) if e.seq] == list(range(1, len(trail) + 1))
        assert trail[0].type is EventType.QUEUED
        assert not events.of(order_id, EventType.COMMAND_REJECTED)
        assert promised_seconds(trail) <= PROMISE_SECONDS, order_id
    assert max_concurrently_working(events, order_ids) <= MAX_RUNNING


async def test_orders_waiting_for_their_reviewer_do_not_hold_back_the_ones_behind_them(
    system: Settings,
    amqp: tuple[broker.Topology, EventLog, AbstractQueue],
) -> None:
    topology, events, _ = amqp
    order_ids = [unique_id("rev") for _ in range(3 * MAX_RUNNING)]
    async with slots_sampled(system) as slots_seen:
        for order_id in order_ids:
            await broker.publish_command(topology, place_order(order_id))
        # with nobody approving, every order still gets as far as its review
        await asyncio.gather(
            *(events.wait_for(order_id, EventType.AWAITING_APPROVAL) for order_id in order_ids)
        )
        for order_id in order_ids:  # all at once: they go on no more than the bound at a time
            await broker.publish_command(topology, approve_order(order_id))
        endings = await asyncio.gather(*(events.wait_for_end(order_id) for order_id in order_ids))

    assert [ending.type for ending in endings] == [EventType.COMPLETED] * len(order_ids)
    for order_id in order_ids:
        assert promised_seconds(events.by_order[order_id]) <= PROMISE_SECONDS, order_id
    assert max(slots_seen) <= MAX_RUNNING
    assert max_concurrently_working(events, order_ids) <= MAX_RUNNING


@asynccontextmanager
async def slots_sampled(settings: Settings) -> AsyncIterator[list[int]]:
    """The slots held, as the admissions table counts them, every few milliseconds of the block."""
    engine = db.create_engine(settings)
    seen: list[int] = []

    async def sample() -> None:
        while True:
            async with engine.connect() as connection:
                held = await connection.scalar(
                    select(func.count()).where(col(Admission.status).in_(HOLDING_SLOT))
                )
            seen.append(held or 0)
            await asyncio.sleep(0.01)

    sampling = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        sampling.cancel()
        with suppress(asyncio.CancelledError):
            await sampling
        await engine.dispose()


def promised_seconds(trail: list[OrderEvent]) -> float:
    """The order's time as the 15 s promise counts it, by its events' dates: `admitted` to its end,
    less the review (`awaiting_approval` to `approved`, the wait for a slot after the approval
    included; to the end if it never was approved); 0 if it ended before admission."""
    at = {e.type: e.occurred_at for e in trail}
    ended = next(e.occurred_at for e in trail if e.type.is_terminal)
    admitted = at.get(EventType.ADMITTED)
    if admitted is None:
        return 0.0
    review = timedelta()
    if (review_began := at.get(EventType.AWAITING_APPROVAL)) is not None:
        review = at.get(EventType.APPROVED, ended) - review_began
    return (ended - admitted - review).total_seconds()


def max_concurrently_working(events: EventLog, order_ids: list[str]) -> int:
    """The most lifecycles at work at any moment: from `admitted` to `awaiting_approval`, and
    from `payment_charged` to their end (an order holds its slot then, and maybe longer)."""
    changes: list[tuple[datetime, int]] = []
    for order_id in order_ids:
        trail = events.by_order[order_id]
        at = {e.type: e.occurred_at for e in trail}
        ended = next((e.occurred_at for e in trail if e.type.is_terminal), None)
        for began, until in (
            (at.get(EventType.ADMITTED), at.get(EventType.AWAITING_APPROVAL, ended)),
            (at.get(EventType.PAYMENT_CHARGED), ended),
        ):
            if began is not None and until is not None:
                changes += [(began, 1), (until, -1)]
    running = peak = 0
    for _, change in sorted(changes, key=lambda c: (c[0], c[1])):  # an end before a start at a tie
        running += change
        peak = max(peak, running)
    return peak

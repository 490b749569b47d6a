"""Admission: at most `max_running_lifecycles` lifecycles run at once; the other placements wait.

The bound is global (every bridge counts the same `admissions` rows), and a placement waits where
it arrived, unacked in the broker, until it holds a slot. Meanwhile the order exists for everyone:
it is registered at once (`queued` event, `queued` in the read model), and commands for it apply
to the waiting order: a cancel ends it before it starts, an approval or an address change is handed
to the lifecycle when it starts. A command that overtakes its order's placement (another bridge has
the placement in hand, or it waits in the broker) is parked on an `unplaced` row and joins the
placement when it registers; it is rejected as `unknown order` only once no placement can still
be waiting for it (see `Bridge.sweep`).

Every decision here is one transaction holding the order's row lock, so bridges racing on one order
take turns; slots are counted under one advisory lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg
import structlog
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from shared.admissions import ADMISSIONS_CHANNEL, HOLDING_SLOT, AdmissionStatus
from shared.consuming import RetrySoon
from shared.contracts import (
    CancelOrder,
    Command,
    OrderState,
    PlaceOrder,
    command_adapter,
)
from shared.db import Admission, insert_order, transaction
from shared.lifecycle import EarlyCommand

# any fixed number: the key of the advisory lock under which slots are counted and taken
SLOT_LOCK_KEY = 0x0F5E_ADD1
# a waiting placement looks again this often even if no release notification reached it
SLOT_POLL_SECONDS = 1.0

log = structlog.get_logger(__name__)

EventPublisher = Callable[[], Awaitable[None]]
"""Publishes a decision's event. Called inside the decision's transaction: a crash before the
commit repeats the decision and the event (same event id) instead of losing the event."""


class AdmissionInProgress(RetrySoon):
    """Another bridge is starting this order's lifecycle right now: try the command again soon."""


@dataclass(frozen=True)
class Registration:
    """A placement as the ledger knows it after registering it."""

    status: AdmissionStatus
    queued_at: datetime
    cancel: CancelOrder | None = None  # the cancel that ended it before admission


@dataclass(frozen=True)
class Slot:
    """A slot taken for an order: what its lifecycle starts with."""

    queued_at: datetime
    early_commands: list[EarlyCommand]


class Steering(StrEnum):
    """What a command (approve, cancel, update address) does to an order that may not run yet."""

    SIGNAL = "signal"  # the lifecycle runs (or ran): signal it
    NO_RECORD = "no_record"  # nothing known here: signal it, the order may predate admission
    APPLIED_WAITING = "applied_waiting"  # kept for the lifecycle's start
    CANCELLED_WAITING = "cancelled_waiting"  # the waiting order ends here, never starting
    PARKED = "parked"  # waits for its order's placement
    ENDED = "ended"  # the order was cancelled before it started


class AdmissionLedger:
    """The `admissions` table, in the transactions that keep bridges from racing."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], max_running: int) -> None:
        self.sessions = sessions
        self._max_running = max_running

    async def register(
        self, command: PlaceOrder, publish: Callable[[Registration], Awaitable[None]]
    ) -> Registration | None:
        """Record a placement and `publish` its events (`queued`, and `cancelled` if a parked cancel
        ends it at once) before the record commits. A redelivered placement finds its record and
        publishes nothing new. None: another command placed this order."""
        async with transaction(self.sessions) as session:
            row = await _locked_row(session, command.order_id)
            if row is None:
                row = Admission(order_id=command.order_id, status=AdmissionStatus.WAITING.value)
                session.add(row)
            elif row.place_command_id is None:  # commands were waiting for this placement
                row.status = AdmissionStatus.WAITING.value
            elif row.place_command_id != command.command_id:
                return None
            else:
                return Registration(AdmissionStatus(row.status), _set(row.queued_at), _cancel_of(row))
            row.place_command_id = command.command_id
            row.queued_at = _set(await session.scalar(select(func.now())))
            cancel = next((c for c in _commands_of(row) if isinstance(c, CancelOrder)), None)
            if cancel is not None:
                row.status = AdmissionStatus.CANCELLED.value
                row.cancel_command_id = cancel.command_id
            # the order is listed from the moment it is accepted; its events move it on
            await insert_order(session, command, OrderState.QUEUED)
            registration = Registration(AdmissionStatus(row.status), row.queued_at, cancel)
            await publish(registration)
            return registration

    async def take_slot(self, order_id: str) -> Slot | AdmissionStatus:
        """A slot for the waiting order, if the running lifecycles leave one; else the order's
        status (`waiting`: no slot free; `cancelled`: it will never need one)."""
        async with transaction(self.sessions) as session:
            row = await _locked_row(session, order_id)
            assert row is not None, "a placement is registered before it asks for a slot"
            status = AdmissionStatus(row.status)
            if status.holds_slot:  # redelivered after its slot was taken: start it (again)
                return Slot(_set(row.queued_at), _early_commands(row))
            if status is not AdmissionStatus.WAITING:
                return status
            await session.execute(select(func.pg_advisory_xact_lock(SLOT_LOCK_KEY)))
            running = await session.scalar(
                select(func.count()).select_from(Admission).where(col(Admission.status).in_(HOLDING_SLOT))
            )
            if (running or 0) >= self._max_running:
                return AdmissionStatus.WAITING
            await session.execute(
                update(Admission)
                .where(col(Admission.order_id) == order_id)
                .values(status=AdmissionStatus.ADMITTING.value, admitted_at=func.now())
            )
            return Slot(_set(row.queued_at), _early_commands(row))

    async def started(self, order_id: str) -> None:
        """The lifecycle runs (unless it has already ended and released its slot)."""
        await self._set_status(order_id, AdmissionStatus.ADMITTING, AdmissionStatus.RUNNING)

    async def not_started(self, order_id: str) -> None:
        """The lifecycle could not start (the order exists otherwise): give the slot back."""
        await self._set_status(order_id, AdmissionStatus.ADMITTING, AdmissionStatus.ENDED)

    async def _set_status(self, order_id: str, before: AdmissionStatus, after: AdmissionStatus) -> None:
        async with transaction(self.sessions) as session:
            await session.execute(
                update(Admission)
                .where(col(Admission.order_id) == order_id, col(Admission.status) == before.value)
                .values(status=after.value)
            )

    async def steer(self, command: Command, publish_cancelled: EventPublisher) -> Steering:
        """Apply a command to its order if the order does not run yet; else say how to apply it."""
        async with transaction(self.sessions) as session:
            row = await _locked_row(session, command.order_id)
            if row is None:
                return Steering.NO_RECORD
            match AdmissionStatus(row.status):
                case AdmissionStatus.ADMITTING:
                    raise AdmissionInProgress(command.order_id)
                case AdmissionStatus.RUNNING | AdmissionStatus.ENDED:
                    return Steering.SIGNAL
                case AdmissionStatus.CANCELLED if row.cancel_command_id == command.command_id:
                    return Steering.CANCELLED_WAITING  # this very cancel, delivered again
                case AdmissionStatus.CANCELLED:
                    return Steering.ENDED
                case AdmissionStatus.UNPLACED:
                    _append(row, command)
                    return Steering.PARKED
            if isinstance(command, CancelOrder):
                row.status = AdmissionStatus.CANCELLED.value
                row.cancel_command_id = command.command_id
                await publish_cancelled()
                return Steering.CANCELLED_WAITING
            _append(row, command)
            return Steering.APPLIED_WAITING

    async def park(self, command: Command) -> bool:
        """Keep a command for a placement not registered yet; False if one registered meanwhile
        (steer the command again)."""
        async with transaction(self.sessions) as session:
            parked = await session.scalar(
                pg_insert(Admission)
                .values(
                    order_id=command.order_id,
                    status=AdmissionStatus.UNPLACED.value,
                    early_commands=[command.model_dump(mode="json")],
                )
                .on_conflict_do_nothing()
                .returning(col(Admission.order_id))
            )
        return parked is not None

    async def now(self) -> datetime:
        async with self.sessions() as session:
            return _set(await session.scalar(select(func.now())))

    async def unplaced_before(self, created_before: datetime) -> list[str]:
        """Orders with commands parked before `created_before` and still no placement."""
        return await self._orders(AdmissionStatus.UNPLACED, col(Admission.created_at) < created_before)

    async def give_up_unplaced(
        self, order_id: str, publish_rejections: Callable[[list[Command]], Awaitable[None]]
    ) -> None:
        """Drop the order's parked commands, publishing their rejections before the drop commits
        (unless a placement registered meanwhile or another bridge is on it)."""
        async with transaction(self.sessions) as session:
            row = await session.scalar(
                select(Admission)
                .where(
                    col(Admission.order_id) == order_id,
                    col(Admission.status) == AdmissionStatus.UNPLACED.value,
                )
                .with_for_update(skip_locked=True)
            )
            if row is None:
                return
            await publish_rejections(_commands_of(row))
            await session.delete(row)

    async def _orders(self, status: AdmissionStatus, condition: ColumnElement[bool]) -> list[str]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(col(Admission.order_id)).where(col(Admission.status) == status.value, condition)
            )
            return list(rows)


async def _locked_row(session: AsyncSession, order_id: str) -> Admission | None:
    return await session.scalar(
        select(Admission).where(col(Admission.order_id) == order_id).with_for_update()
    )


def _commands_of(row: Admission) -> list[Command]:
    return [command_adapter.validate_python(c) for c in row.early_commands]


def _early_commands(row: Admission) -> list[EarlyCommand]:
    return [c for c in _commands_of(row) if not isinstance(c, CancelOrder | PlaceOrder)]


def _cancel_of(row: Admission) -> CancelOrder | None:
    if row.cancel_command_id is None:
        return None
    return next(
        (
            c
            for c in _commands_of(row)
            if isinstance(c, CancelOrder) and c.command_id == row.cancel_command_id
        ),
        None,
    )


def _append(row: Admission, command: Command) -> None:
    # a new list, so the ORM sees the JSONB column change
    row.early_commands = [*row.early_commands, command.model_dump(mode="json")]


def _set(value: datetime | None) -> datetime:
    assert value is not None
    return value


class SlotGate:
    """Where this bridge's placements wait for a slot: one asks at a time, in arrival order, and
    asks again when a lifecycle anywhere releases one (PostgreSQL NOTIFY) or every second."""

    def __init__(self, database_url: str) -> None:
        self._dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._released = asyncio.Event()
        self._turn = asyncio.Lock()

    async def wait_for(
        self, take: Callable[[], Awaitable[Slot | AdmissionStatus]], stop: asyncio.Event
    ) -> Slot | AdmissionStatus:
        """Run `take` until it returns anything but `waiting` (`waiting` if stopped first)."""
        async with self._turn:
            while True:
                self._released.clear()
                outcome = await take()
                if outcome is not AdmissionStatus.WAITING:
                    return outcome
                if await _first_of(self._released, stop, SLOT_POLL_SECONDS) is stop:
                    return AdmissionStatus.WAITING

    async def listen(self, stop: asyncio.Event) -> None:
        """Hear slot releases until `stop`; reconnects, and polling covers the gaps."""
        while not stop.is_set():
            try:
                connection = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("cannot listen for slot releases; polling", error=repr(error))
                await _first_of(stop, stop, 5.0)
                continue
            lost = _set_when_lost(connection)
            await connection.add_listener(ADMISSIONS_CHANNEL, lambda *_: self._released.set())
            try:
                await _first_of(stop, lost, None)
            finally:
                with suppress(Exception):
                    await connection.close()


def _set_when_lost(connection: asyncpg.Connection) -> asyncio.Event:
    """An event set when this connection ends (its own: a listener outlives the loop's round)."""
    lost = asyncio.Event()
    connection.add_termination_listener(lambda _: lost.set())
    return lost


async def _first_of(a: asyncio.Event, b: asyncio.Event, timeout: float | None) -> asyncio.Event | None:
    """Wait until `a` or `b` is set (returns it) or `timeout` passes (None)."""
    waits = {asyncio.create_task(a.wait()): a, asyncio.create_task(b.wait()): b}
    done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return waits[done.pop()] if done else None

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
take turns; slots are counted under one advisory lock, taken after the row lock. The ledger also
keeps `processed_commands`, so that a command's outcome is recorded in the same transaction (often
the same statement) as the admission change it goes with. The statements are built once, in SQL:
the bridge runs a few per order, and building and flushing ORM objects cost more than the round
trips themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Row, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.bridge.lifecycles import Outcome, forbidden
from shared.admissions import ADMISSIONS_CHANNEL, LOCK_SLOTS, AdmissionStatus
from shared.authorization import refusal
from shared.consuming import RetrySoon
from shared.contracts import (
    CancelOrder,
    Command,
    OrderState,
    PlaceOrder,
    command_adapter,
)
from shared.db import INSERT_ORDER, order_row
from shared.lifecycle import EarlyCommand
from shared.notifications import ChannelListener, first_of
from shared.settings import Settings

# a waiting placement looks again this often even if no release notification reached it
SLOT_POLL_SECONDS = 1.0

EventPublisher = Callable[[], Awaitable[None]]
"""Publishes a decision's event. Called inside the decision's transaction: a crash before the
commit repeats the decision and the event (same event id) instead of losing the event."""

# --- the statements ------------------------------------------------------------------------------
# a new placement's row, unless the order has one (a parked command's, or a placement's) or this
# very command was processed before the admissions table existed: then the locked path decides
REGISTER_NEW = text(
    """
    INSERT INTO admissions (order_id, status, place_command_id, placed_by, queued_at)
    SELECT :order_id, 'waiting', :command_id, :placed_by, now()
    WHERE NOT EXISTS (SELECT FROM processed_commands WHERE command_id = :command_id)
    ON CONFLICT (order_id) DO NOTHING
    RETURNING queued_at
    """
)
LOCK_ADMISSION = text(
    """
    SELECT status, place_command_id, placed_by, cancel_command_id, early_commands, queued_at
    FROM admissions WHERE order_id = :order_id FOR UPDATE
    """
).columns(early_commands=JSONB)
REGISTER_PARKED = text(
    """
    UPDATE admissions SET status = :status, place_command_id = :command_id, placed_by = :placed_by,
        queued_at = now(), cancel_command_id = :cancel_command_id, early_commands = :commands
    WHERE order_id = :order_id
    RETURNING queued_at
    """
).bindparams(bindparam("commands", type_=JSONB))
# under LOCK_SLOTS, taken by an earlier statement: this statement's snapshot then sees every slot
# taken before (one snapshot per statement), which a lock taken within it would not; approved
# orders waiting to go on (`resuming`) come before any placement
TAKE_FREE_SLOT = text(
    """
    UPDATE admissions SET status = 'admitting', admitted_at = now()
    WHERE order_id = :order_id
      AND (SELECT count(*) FROM admissions
           WHERE status IN ('admitting', 'running', 'resuming')) < :max_running
    RETURNING order_id
    """
)
# the lifecycle's start, and the placement's outcome, in one statement: both or neither
SETTLE_START = text(
    """
    WITH admission AS (
        UPDATE admissions SET status = :status WHERE order_id = :order_id AND status = 'admitting'
    )
    INSERT INTO processed_commands (command_id, order_id, type, outcome, detail)
    VALUES (:command_id, :order_id, :type, :outcome, :detail)
    ON CONFLICT (command_id) DO NOTHING
    """
)
RECORD = text(
    """
    INSERT INTO processed_commands (command_id, order_id, type, outcome, detail)
    VALUES (:command_id, :order_id, :type, :outcome, :detail)
    ON CONFLICT (command_id) DO NOTHING
    """
)
RECORD_REPLACING = text(
    """
    INSERT INTO processed_commands (command_id, order_id, type, outcome, detail)
    VALUES (:command_id, :order_id, :type, :outcome, :detail)
    ON CONFLICT (command_id) DO UPDATE SET outcome = excluded.outcome, detail = excluded.detail
    """
)
IS_PROCESSED = text("SELECT EXISTS (SELECT FROM processed_commands WHERE command_id = :command_id)")
# what a command finds, read without a lock: enough when it settles the matter (see `steer`)
COMMAND_SEES = text(
    """
    SELECT EXISTS (SELECT FROM processed_commands WHERE command_id = :command_id) AS processed,
           (SELECT status FROM admissions WHERE order_id = :order_id) AS status
    """
)
KEEP_FOR_START = text(
    "UPDATE admissions SET early_commands = early_commands || :command WHERE order_id = :order_id"
).bindparams(bindparam("command", type_=JSONB))
CANCEL_WAITING = text(
    "UPDATE admissions SET status = 'cancelled', cancel_command_id = :command_id WHERE order_id = :order_id"
)
PARK = text(
    """
    INSERT INTO admissions (order_id, status, early_commands)
    VALUES (:order_id, 'unplaced', :commands)
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id
    """
).bindparams(bindparam("commands", type_=JSONB))
NOW = text("SELECT now()")
UNPLACED_BEFORE = text("SELECT order_id FROM admissions WHERE status = 'unplaced' AND created_at < :before")
LOCK_UNPLACED = text(
    """
    SELECT early_commands FROM admissions WHERE order_id = :order_id AND status = 'unplaced'
    FOR UPDATE SKIP LOCKED
    """
).columns(early_commands=JSONB)
DELETE_ADMISSION = text("DELETE FROM admissions WHERE order_id = :order_id")


class AdmissionInProgress(RetrySoon):
    """Another bridge is starting this order's lifecycle right now: try the command again soon."""


@dataclass(frozen=True)
class Slot:
    """A slot taken for an order: what its lifecycle starts with."""

    queued_at: datetime
    early_commands: list[EarlyCommand]


@dataclass(frozen=True)
class Refused:
    """A parked command its order's placer turned out not to allow: rejected as it registers."""

    command: Command
    outcome: Outcome


@dataclass(frozen=True)
class Registration:
    """A placement as the ledger knows it after registering it."""

    status: AdmissionStatus
    queued_at: datetime
    cancel: CancelOrder | None = None  # the cancel that ended it before admission
    slot: Slot | None = None  # the slot it holds already (taken as it registered, or before)
    refused: tuple[Refused, ...] = ()  # parked commands rejected as it registered


class NotRegistered(StrEnum):
    """Why a placement was not registered."""

    PROCESSED = "processed"  # this very command has had its effect: nothing to do
    PLACED_BY_ANOTHER = "placed_by_another"  # another command placed this order


class Steering(StrEnum):
    """What a command (approve, cancel, update address) does to an order that may not run yet."""

    PROCESSED = "processed"  # this very command has had its effect: nothing to do
    SIGNAL = "signal"  # the lifecycle runs (or ran): signal it
    NO_RECORD = "no_record"  # nothing known here: signal it, the order may predate admission
    APPLIED_WAITING = "applied_waiting"  # kept for the lifecycle's start
    CANCELLED_WAITING = "cancelled_waiting"  # the waiting order ends here, never starting
    PARKED = "parked"  # waits for its order's placement
    ENDED = "ended"  # the order was cancelled before it started


class AdmissionLedger:
    """The bridge's records: the `admissions` table, in the transactions that keep bridges from
    racing, and `processed_commands`, the outcome of each command that has had its one effect."""

    def __init__(self, engine: AsyncEngine, max_running: int) -> None:
        self._engine = engine
        # a statement that is a transaction by itself needs no BEGIN and COMMIT round trips
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._max_running = max_running

    # --- placements ------------------------------------------------------------------------------
    async def register(
        self,
        command: PlaceOrder,
        publish: Callable[[Registration], Awaitable[None]],
        take_free_slot: bool,
    ) -> Registration | NotRegistered:
        """Record a placement and `publish` its events (`queued`, and `cancelled` if a parked cancel
        ends it at once) before the record commits; with `take_free_slot`, take a slot in the same
        transaction if one is free. A redelivered placement finds its record and publishes
        nothing new."""
        async with self._engine.begin() as connection:
            while (found := await self._find_or_add(connection, command)) is None:
                pass  # the row in the way was deleted before it could be locked: add the placement's
            if not isinstance(found, _NewRegistration):
                return found
            # the order is listed from the moment it is accepted; its events move it on
            await connection.execute(INSERT_ORDER, order_row(command, OrderState.QUEUED))
            registration = Registration(found.status, found.queued_at, found.cancel, refused=found.refused)
            await publish(registration)
            for refused in found.refused:  # recorded as waiting for the placement until now
                await connection.execute(RECORD_REPLACING, _record(refused.command, refused.outcome))
            if (
                take_free_slot
                and found.status is AdmissionStatus.WAITING
                and await self._take_free_slot(connection, command.order_id)
            ):
                slot = Slot(found.queued_at, found.early_commands)
                return replace(registration, status=AdmissionStatus.ADMITTING, slot=slot)
            return registration

    async def _find_or_add(
        self, connection: AsyncConnection, command: PlaceOrder
    ) -> _NewRegistration | Registration | NotRegistered | None:
        """The placement added (to a row of its own or its parked commands' row), or what was
        there before; None if the row that kept it out went away before it could be locked."""
        ids = {"order_id": command.order_id, "command_id": command.command_id}
        placed_by = _subject(command)
        queued_at = await connection.scalar(REGISTER_NEW, {**ids, "placed_by": placed_by})
        if queued_at is not None:
            return _NewRegistration(AdmissionStatus.WAITING, queued_at)
        row = (await connection.execute(LOCK_ADMISSION, ids)).first()
        # a statement after the lock has a snapshot of its own: it sees a record its holder made
        if await connection.scalar(IS_PROCESSED, ids):
            return NotRegistered.PROCESSED
        if row is None:
            return None
        if row.place_command_id is None:  # commands were waiting for this placement
            kept, refused = _judge(_commands_of(row), placed_by)
            cancel = next((c for c in kept if isinstance(c, CancelOrder)), None)
            status = AdmissionStatus.WAITING if cancel is None else AdmissionStatus.CANCELLED
            queued_at = await connection.scalar(
                REGISTER_PARKED,
                {
                    **ids,
                    "status": status.value,
                    "cancel_command_id": cancel.command_id if cancel else None,
                    "placed_by": placed_by,
                    "commands": [_entry(c) for c in kept],
                },
            )
            return _NewRegistration(status, queued_at, cancel, _early(kept), refused)
        if row.place_command_id != command.command_id:
            return NotRegistered.PLACED_BY_ANOTHER
        status = AdmissionStatus(row.status)
        # redelivered after its slot was taken: it starts (again) without asking for one
        slot = Slot(row.queued_at, _early_commands(row)) if status.holds_slot else None
        return Registration(status, row.queued_at, _cancel_of(row), slot)

    async def take_slot(self, order_id: str) -> Slot | AdmissionStatus:
        """A slot for the waiting order, if the running lifecycles leave one; else the order's
        status (`waiting`: no slot free; `cancelled`: it will never need one)."""
        async with self._engine.begin() as connection:
            row = (await connection.execute(LOCK_ADMISSION, {"order_id": order_id})).one()
            status = AdmissionStatus(row.status)
            if status.holds_slot:  # another delivery of the placement took it: start it (again)
                return Slot(row.queued_at, _early_commands(row))
            if status is not AdmissionStatus.WAITING:
                return status
            if not await self._take_free_slot(connection, order_id):
                return AdmissionStatus.WAITING
            return Slot(row.queued_at, _early_commands(row))

    async def _take_free_slot(self, connection: AsyncConnection, order_id: str) -> bool:
        """Turn the order, locked and waiting, `admitting` if fewer than the bound hold slots."""
        await connection.execute(LOCK_SLOTS)
        taken = await connection.scalar(
            TAKE_FREE_SLOT, {"order_id": order_id, "max_running": self._max_running}
        )
        return taken is not None

    async def started(self, command: PlaceOrder, outcome: Outcome) -> None:
        """The lifecycle runs (unless it has already ended and released its slot); records the
        placement's outcome with it."""
        await self._settle_start(command, outcome, AdmissionStatus.RUNNING)

    async def not_started(self, command: PlaceOrder, outcome: Outcome) -> None:
        """The lifecycle could not start (the order exists otherwise): give the slot back, and
        record the placement's outcome with it."""
        await self._settle_start(command, outcome, AdmissionStatus.ENDED)

    async def _settle_start(self, command: PlaceOrder, outcome: Outcome, status: AdmissionStatus) -> None:
        async with self._autocommit.connect() as connection:
            await connection.execute(SETTLE_START, {**_record(command, outcome), "status": status.value})

    # --- approve, cancel, update address ---------------------------------------------------------
    async def steer(self, command: Command, publish_cancelled: EventPublisher) -> Steering | Outcome:
        """Apply a command to its order if the order does not run yet; else say how to apply it
        (or, for a waiting order, that its issuer may not: `forbidden`)."""
        ids = {"order_id": command.order_id, "command_id": command.command_id}
        async with self._autocommit.connect() as connection:
            seen = (await connection.execute(COMMAND_SEES, ids)).one()
        if seen.processed:
            return Steering.PROCESSED
        if seen.status is None:
            return Steering.NO_RECORD
        if AdmissionStatus(seen.status).lifecycle_started:
            return Steering.SIGNAL  # states an order never leaves for one a command could change
        async with self._engine.begin() as connection:
            row = (await connection.execute(LOCK_ADMISSION, ids)).first()
            if row is None:  # its parked commands were given up meanwhile
                return Steering.NO_RECORD
            match AdmissionStatus(row.status):
                case AdmissionStatus.ADMITTING:
                    raise AdmissionInProgress(command.order_id)
                case status if status.lifecycle_started:
                    return Steering.SIGNAL
                case AdmissionStatus.CANCELLED if row.cancel_command_id == command.command_id:
                    return Steering.CANCELLED_WAITING  # this very cancel, delivered again
                case AdmissionStatus.CANCELLED:
                    return Steering.ENDED
                case AdmissionStatus.UNPLACED:
                    await connection.execute(KEEP_FOR_START, {**ids, "command": [_entry(command)]})
                    return Steering.PARKED
            why = refusal(command.type, command.issued_by, row.placed_by, in_review=False)
            if why is not None:
                return forbidden(why)
            if isinstance(command, CancelOrder):
                await connection.execute(CANCEL_WAITING, ids)
                await publish_cancelled()
                return Steering.CANCELLED_WAITING
            await connection.execute(KEEP_FOR_START, {**ids, "command": [_entry(command)]})
            return Steering.APPLIED_WAITING

    async def park(self, command: Command) -> bool:
        """Keep a command for a placement not registered yet; False if one registered meanwhile
        (steer the command again)."""
        async with self._autocommit.connect() as connection:
            parked = await connection.scalar(
                PARK, {"order_id": command.order_id, "commands": [_entry(command)]}
            )
        return parked is not None

    async def is_processed(self, command: Command) -> bool:
        async with self._autocommit.connect() as connection:
            return bool(await connection.scalar(IS_PROCESSED, {"command_id": command.command_id}))

    async def record(self, command: Command, outcome: Outcome, replace: bool = False) -> None:
        """Record the command's outcome; `replace` overrules an earlier one (a parked command
        rejected)."""
        async with self._autocommit.connect() as connection:
            await connection.execute(RECORD_REPLACING if replace else RECORD, _record(command, outcome))

    # --- housekeeping ----------------------------------------------------------------------------
    async def now(self) -> datetime:
        async with self._autocommit.connect() as connection:
            return _set(await connection.scalar(NOW))

    async def unplaced_before(self, created_before: datetime) -> list[str]:
        """Orders with commands parked before `created_before` and still no placement."""
        async with self._autocommit.connect() as connection:
            return list(await connection.scalars(UNPLACED_BEFORE, {"before": created_before}))

    async def give_up_unplaced(
        self, order_id: str, publish_rejections: Callable[[list[Command]], Awaitable[None]]
    ) -> None:
        """Drop the order's parked commands, publishing their rejections before the drop commits
        (unless a placement registered meanwhile or another bridge is on it)."""
        async with self._engine.begin() as connection:
            row = (await connection.execute(LOCK_UNPLACED, {"order_id": order_id})).first()
            if row is None:
                return
            await publish_rejections(_commands_of(row))
            await connection.execute(DELETE_ADMISSION, {"order_id": order_id})


@dataclass(frozen=True)
class _NewRegistration:
    """A placement registered just now: its events are still to be published."""

    status: AdmissionStatus  # `waiting`, or `cancelled` by a parked cancel
    queued_at: datetime
    cancel: CancelOrder | None = None
    early_commands: list[EarlyCommand] = field(default_factory=list)
    refused: tuple[Refused, ...] = ()


def _record(command: Command, outcome: Outcome) -> dict[str, Any]:
    return {
        "command_id": command.command_id,
        "order_id": command.order_id,
        "type": command.type.value,
        "outcome": outcome.kind.value,
        "detail": outcome.detail,
    }


def _entry(command: Command) -> dict[str, Any]:
    """A command as `early_commands` keeps it."""
    return command.model_dump(mode="json")


def _commands_of(row: Row[Any]) -> list[Command]:
    return [command_adapter.validate_python(c) for c in row.early_commands]


def _early_commands(row: Row[Any]) -> list[EarlyCommand]:
    return _early(_commands_of(row))


def _early(commands: list[Command]) -> list[EarlyCommand]:
    return [c for c in commands if not isinstance(c, CancelOrder | PlaceOrder)]


def _subject(command: Command) -> str | None:
    return command.issued_by.subject if command.issued_by else None


def _judge(parked: list[Command], placed_by: str | None) -> tuple[list[Command], tuple[Refused, ...]]:
    """The parked commands the order's placer allows, and the others with why not (an order
    waiting for admission is not in review)."""
    kept: list[Command] = []
    refused: list[Refused] = []
    for command in parked:
        why = refusal(command.type, command.issued_by, placed_by, in_review=False)
        if why is None:
            kept.append(command)
        else:
            refused.append(Refused(command, forbidden(why)))
    return kept, tuple(refused)


def _cancel_of(row: Row[Any]) -> CancelOrder | None:
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


def _set(value: datetime | None) -> datetime:
    assert value is not None
    return value


class SlotGate:
    """Where this bridge's placements wait for a slot: one asks at a time, in arrival order, and
    asks again when a lifecycle anywhere releases one (PostgreSQL NOTIFY) or every second."""

    def __init__(self, settings: Settings) -> None:
        self._released = asyncio.Event()
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._listener = ChannelListener(settings, ADMISSIONS_CHANNEL, self._released.set)

    def idle(self) -> bool:
        """No placement waits here: one registering now takes a free slot without overtaking any."""
        return not self._waiting

    async def wait_for(
        self, take: Callable[[], Awaitable[Slot | AdmissionStatus]], stop: asyncio.Event
    ) -> Slot | AdmissionStatus:
        """Run `take` until it returns anything but `waiting` (`waiting` if stopped first)."""
        self._waiting += 1
        try:
            async with self._turn:
                while True:
                    self._released.clear()
                    outcome = await take()
                    if outcome is not AdmissionStatus.WAITING:
                        return outcome
                    if await first_of(self._released, stop, SLOT_POLL_SECONDS) is stop:
                        return AdmissionStatus.WAITING
        finally:
            self._waiting -= 1

    async def listen(self, stop: asyncio.Event) -> None:
        """Hear slot releases until `stop`; reconnects, and polling covers the gaps."""
        await self._listener.run(stop)

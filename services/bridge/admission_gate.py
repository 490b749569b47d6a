"""The admission gate: at most `max_running_lifecycles` lifecycles run at once across bridges
(the `admissions` table); other placements wait, unacked, for a slot. Commands apply to a waiting
order; one that overtakes its placement is parked on an `unplaced` row until it registers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from pydantic.dataclasses import dataclass as pydantic_dataclass
from sqlalchemy import Executable, Result, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.bridge.lifecycles import (
    ORDER_ENDED,
    ORDER_EXISTS,
    QUEUED_SEQ,
    Outcome,
    OutcomeKind,
    SteeringCommand,
    forbidden,
)
from shared.admission_table import ADMISSIONS_CHANNEL, LOCK_SLOTS, AdmissionStatus
from shared.authorization import refusal
from shared.consuming import RetrySoon
from shared.contracts import CancelOrder, Command, OrderState, PlaceOrder
from shared.db import INSERT_ORDER, order_row
from shared.lifecycle import EarlyCommand
from shared.notifications import ChannelListener, first_of
from shared.settings import Settings

CANCELLED_SEQ = QUEUED_SEQ + 1  # the end of an order cancelled while it waited
NO_REASON_GIVEN = "cancelled on request"

# an order never leaves these for a status a command could change: its commands go to the lifecycle
LIFECYCLE_STARTED = frozenset(
    {AdmissionStatus.RUNNING, AdmissionStatus.REVIEWING, AdmissionStatus.RESUMING, AdmissionStatus.ENDED}
)

# a waiting placement looks again this often even if no release notification reached it
SLOT_POLL_SECONDS = 1.0

# a command found in `processed_commands`: acked, and not recorded again
ALREADY_PROCESSED = Outcome(OutcomeKind.DUPLICATE, "command already processed")
PLACED_BY_ANOTHER = Outcome(OutcomeKind.REJECTED, ORDER_EXISTS)
WAITING_FOR_PLACEMENT = Outcome(OutcomeKind.ACCEPTED, "waiting for the order's placement")
APPLIES_AT_START = Outcome(OutcomeKind.ACCEPTED, "applies when the order's lifecycle starts")
CANCELLED_BEFORE_ADMISSION = Outcome(OutcomeKind.ACCEPTED, "cancelled before its lifecycle started")
ENDED_BEFORE_ADMISSION = Outcome(OutcomeKind.REJECTED, ORDER_ENDED)

# a placement's row, unless its order has one or this command was processed: the locked path decides
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
    SELECT status, place_command_id, placed_by, cancel_command_id, early_commands AS commands, queued_at
    FROM admissions WHERE order_id = :order_id FOR UPDATE
    """
).columns(commands=JSONB)
REGISTER_PARKED = text(
    """
    UPDATE admissions SET status = :status, place_command_id = :command_id, placed_by = :placed_by,
        queued_at = now(), cancel_command_id = :cancel_command_id, early_commands = :commands
    WHERE order_id = :order_id
    RETURNING queued_at
    """
).bindparams(bindparam("commands", type_=JSONB))
# as the registration's events leave the order: the audit may record them before this row commits
LIST_ORDER = INSERT_ORDER.values(last_event_seq=bindparam("last_event_seq"), reason=bindparam("reason"))
# under LOCK_SLOTS, taken by an earlier statement, so that this one's snapshot sees every slot
# taken before; approved orders waiting to go on (`resuming`) come before any placement
TAKE_FREE_SLOT = text(
    """
    UPDATE admissions SET status = 'admitting', admitted_at = now()
    WHERE order_id = :order_id
      AND (SELECT count(*) FROM admissions
           WHERE status IN ('admitting', 'running', 'resuming')) < :max_running
    RETURNING order_id
    """
)
RECORD_SQL = """
    INSERT INTO processed_commands (command_id, order_id, type, outcome, detail)
    VALUES (:command_id, :order_id, :type, :outcome, :detail)
    ON CONFLICT (command_id) DO UPDATE SET outcome = excluded.outcome, detail = excluded.detail
    WHERE CAST(:replace AS boolean)
"""
RECORD = text(RECORD_SQL)
# the lifecycle's start and the placement's outcome in one statement: both or neither
SETTLE_START = text(
    "WITH admission AS (UPDATE admissions SET status = :status WHERE order_id = :order_id"
    f" AND status = 'admitting') {RECORD_SQL}"
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
    INSERT INTO admissions (order_id, status, early_commands) VALUES (:order_id, 'unplaced', :commands)
    ON CONFLICT (order_id) DO NOTHING
    RETURNING order_id
    """
).bindparams(bindparam("commands", type_=JSONB))
NOW = text("SELECT now()")
UNPLACED_BEFORE = text("SELECT order_id FROM admissions WHERE status = 'unplaced' AND created_at < :before")
DELETE_ADMISSION = text("DELETE FROM admissions WHERE order_id = :order_id")


class AdmissionInProgress(RetrySoon):
    """Another bridge is starting this order's lifecycle: try the command again soon."""


@dataclass(frozen=True)
class Slot:
    """A slot taken for an order: what its lifecycle starts with."""

    queued_at: datetime
    early_commands: list[EarlyCommand]


# a parked command the order's placer does not allow, and its rejection as the placement registers
Refused = tuple[Command, Outcome]


@dataclass(frozen=True)
class Registration:
    """A placement as the ledger knows it after registering it."""

    status: AdmissionStatus
    queued_at: datetime
    cancel: CancelOrder | None = None  # the cancel that ended it before admission
    slot: Slot | None = None  # the slot it holds already (taken as it registered, or before)
    refused: tuple[Refused, ...] = ()  # parked commands rejected as it registered


class Signal(StrEnum):
    """A command the gate leaves to the order's lifecycle."""

    STARTED = "started"  # the lifecycle runs, or ran
    IF_ANY = "if_any"  # nothing known here: the order may predate admission, or its placement be behind


@pydantic_dataclass
class AdmissionRecord:
    """An order's `admissions` row."""

    status: AdmissionStatus
    place_command_id: UUID | None  # None: its commands wait for the placement
    placed_by: str | None
    cancel_command_id: UUID | None
    commands: list[Command]  # parked, or kept for the lifecycle's start
    queued_at: datetime | None

    @property
    def slot(self) -> Slot:
        assert self.queued_at is not None, "a placed order was queued"
        return Slot(self.queued_at, early_commands(self.commands))


def judge_parked(parked: list[Command], placed_by: str | None) -> tuple[list[Command], tuple[Refused, ...]]:
    """The parked commands the placer allows, and the others with why not (not in review yet)."""
    verdicts = [(c, refusal(c.type, c.issued_by, placed_by, in_review=False)) for c in parked]
    refused = tuple((command, forbidden(why)) for command, why in verdicts if why is not None)
    return [command for command, why in verdicts if why is None], refused


def registered_before(record: AdmissionRecord, command: PlaceOrder) -> Registration | Outcome:
    """What a placement finds on its order's placed row: its own registration, or another's."""
    if record.place_command_id != command.command_id:
        return PLACED_BY_ANOTHER
    slot = record.slot
    # delivered again after its slot was taken: it starts (again) without asking for one
    return Registration(record.status, slot.queued_at, slot=slot if record.status.holds_slot else None)


def steering(record: AdmissionRecord | None, command: SteeringCommand) -> Outcome | Signal:
    """What `command` does to its order as the locked row has it (or why its issuer may not)."""
    if record is None:  # its parked commands were given up meanwhile
        return Signal.IF_ANY
    match record.status:
        case AdmissionStatus.ADMITTING:
            raise AdmissionInProgress(command.order_id)
        case status if status in LIFECYCLE_STARTED:
            return Signal.STARTED
        case AdmissionStatus.CANCELLED if record.cancel_command_id == command.command_id:
            return CANCELLED_BEFORE_ADMISSION  # this very cancel, delivered again
        case AdmissionStatus.CANCELLED:
            return ENDED_BEFORE_ADMISSION
        case AdmissionStatus.UNPLACED:
            return WAITING_FOR_PLACEMENT
    why = refusal(command.type, command.issued_by, record.placed_by, in_review=False)
    if why is not None:
        return forbidden(why)
    return CANCELLED_BEFORE_ADMISSION if isinstance(command, CancelOrder) else APPLIES_AT_START


def order_listing(command: PlaceOrder, cancel: CancelOrder | None) -> dict[str, object]:
    """`LIST_ORDER`'s parameters: the order `queued`, or `cancelled` by a parked cancel."""
    if cancel is None:
        return {**order_row(command, OrderState.QUEUED), "last_event_seq": QUEUED_SEQ, "reason": None}
    ended = order_row(command, OrderState.CANCELLED)
    return {**ended, "last_event_seq": CANCELLED_SEQ, "reason": cancel_reason(cancel)}


def cancel_reason(command: SteeringCommand) -> str:
    return (command.payload.reason if isinstance(command, CancelOrder) else None) or NO_REASON_GIVEN


def early_commands(commands: list[Command]) -> list[EarlyCommand]:
    return [c for c in commands if not isinstance(c, CancelOrder | PlaceOrder)]


class AdmissionLedger:
    """The `admissions` table, changed in transactions that keep bridges from racing, and
    `processed_commands`, each command's outcome (recorded with its admission change)."""

    def __init__(self, engine: AsyncEngine, max_running: int) -> None:
        self._engine = engine
        # a statement that is a transaction by itself needs no BEGIN and COMMIT round trips
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._max_running = max_running

    async def register(
        self, command: PlaceOrder, publish: Callable[[Registration], Awaitable[None]], take_free_slot: bool
    ) -> Registration | Outcome:
        """Record a placement, list its order and `publish` its events before the commit (a crash
        repeats them, same ids); with `take_free_slot`, take a free slot in the same transaction."""
        async with self._engine.begin() as connection:
            while (added := await self._add(connection, command)) is None:
                pass  # the row in the way was deleted before it could be locked: add the placement's
            if not isinstance(added, tuple):
                return added
            registration, early = added
            await connection.execute(LIST_ORDER, order_listing(command, registration.cancel))
            await publish(registration)
            for parked, outcome in registration.refused:  # recorded as waiting for the placement until now
                await connection.execute(RECORD, _record(parked, outcome, replace=True))
            if (
                take_free_slot
                and registration.status is AdmissionStatus.WAITING
                and await self._take_free_slot(connection, command.order_id)
            ):
                slot = Slot(registration.queued_at, early)
                return replace(registration, status=AdmissionStatus.ADMITTING, slot=slot)
            return registration

    async def _add(
        self, connection: AsyncConnection, command: PlaceOrder
    ) -> tuple[Registration, list[EarlyCommand]] | Registration | Outcome | None:
        """The placement just added (its events still to publish) with the commands its lifecycle starts
        with, or what was there before; None if the row in its way went away before it could be locked."""
        ids = {"order_id": command.order_id, "command_id": command.command_id}
        placed_by = command.issued_by.subject if command.issued_by else None
        queued_at = await connection.scalar(REGISTER_NEW, {**ids, "placed_by": placed_by})
        if queued_at is not None:
            return Registration(AdmissionStatus.WAITING, queued_at), []
        record = await _locked(connection, command.order_id)
        # a statement after the lock has a snapshot of its own: it sees a record its holder made
        if await connection.scalar(IS_PROCESSED, ids):
            return ALREADY_PROCESSED
        if record is None:
            return None
        if record.place_command_id is not None:
            return registered_before(record, command)
        kept, refused = judge_parked(record.commands, placed_by)
        cancel = next((c for c in kept if isinstance(c, CancelOrder)), None)
        status = AdmissionStatus.WAITING if cancel is None else AdmissionStatus.CANCELLED
        parameters = {
            **ids,
            "status": status.value,
            "cancel_command_id": cancel.command_id if cancel else None,
            "placed_by": placed_by,
            "commands": [c.model_dump(mode="json") for c in kept],
        }
        queued_at = await connection.scalar(REGISTER_PARKED, parameters)
        return Registration(status, queued_at, cancel, refused=refused), early_commands(kept)

    async def take_slot(self, order_id: str) -> Slot | AdmissionStatus:
        """A slot for the waiting order if one is free, else its status (`waiting` or `cancelled`)."""
        async with self._engine.begin() as connection:
            record = await _locked(connection, order_id)
            assert record is not None, "a registered placement keeps its row"
            if record.status is AdmissionStatus.WAITING and await self._take_free_slot(connection, order_id):
                return record.slot
            # one that holds a slot was taken by another delivery of the placement: start it (again)
            return record.slot if record.status.holds_slot else record.status

    async def _take_free_slot(self, connection: AsyncConnection, order_id: str) -> bool:
        """Turn the locked, waiting order `admitting` if fewer than the bound hold slots."""
        await connection.execute(LOCK_SLOTS)
        parameters = {"order_id": order_id, "max_running": self._max_running}
        return await connection.scalar(TAKE_FREE_SLOT, parameters) is not None

    async def _run(self, statement: Executable, parameters: Mapping[str, object]) -> Result[Any]:  # any row
        async with self._autocommit.connect() as connection:
            return await connection.execute(statement, parameters)

    async def settle_start(self, command: PlaceOrder, outcome: Outcome) -> None:
        """Record the placement's outcome with its slot: kept by a running lifecycle, or given back."""
        status = AdmissionStatus.ENDED if outcome.kind is OutcomeKind.REJECTED else AdmissionStatus.RUNNING
        await self._run(SETTLE_START, {**_record(command, outcome), "status": status.value})

    async def steer(
        self, command: SteeringCommand, publish_cancelled: Callable[[], Awaitable[None]]
    ) -> Outcome | Signal:
        """Apply a command to an order not running yet (publishing `cancelled` first if it ends it),
        or leave it to the lifecycle."""
        ids = {"order_id": command.order_id, "command_id": command.command_id}
        seen = (await self._run(COMMAND_SEES, ids)).one()
        if seen.processed:
            return ALREADY_PROCESSED
        if seen.status is None:
            return Signal.IF_ANY
        if AdmissionStatus(seen.status) in LIFECYCLE_STARTED:
            return Signal.STARTED
        async with self._engine.begin() as connection:
            record = await _locked(connection, command.order_id)
            decision = steering(record, command)
            waiting = record is not None and record.status is AdmissionStatus.WAITING
            if decision in (WAITING_FOR_PLACEMENT, APPLIES_AT_START):
                await connection.execute(
                    KEEP_FOR_START, {**ids, "command": [command.model_dump(mode="json")]}
                )
            elif decision is CANCELLED_BEFORE_ADMISSION and waiting:  # not a cancel delivered again
                await connection.execute(CANCEL_WAITING, ids)
                await publish_cancelled()
            return decision

    async def park(self, command: Command) -> bool:
        """Keep a command for a placement to come; False if one registered meanwhile."""
        parameters = {"order_id": command.order_id, "commands": [command.model_dump(mode="json")]}
        return (await self._run(PARK, parameters)).first() is not None

    async def is_processed(self, command: Command) -> bool:
        return bool((await self._run(IS_PROCESSED, {"command_id": command.command_id})).scalar())

    async def record(self, command: Command, outcome: Outcome, replace: bool = False) -> None:
        """Record the command's outcome; `replace` overrules an earlier one (a parked command's)."""
        await self._run(RECORD, _record(command, outcome, replace))

    async def now(self) -> datetime:
        now: datetime = (await self._run(NOW, {})).scalar_one()
        return now

    async def unplaced_before(self, created_before: datetime) -> list[str]:
        """Orders with commands parked before `created_before` and still no placement."""
        return list((await self._run(UNPLACED_BEFORE, {"before": created_before})).scalars())

    async def give_up_unplaced(
        self, order_id: str, publish_rejections: Callable[[list[Command]], Awaitable[None]]
    ) -> None:
        """Drop the order's parked commands (unless its placement came), publishing their rejections first."""
        async with self._engine.begin() as connection:
            record = await _locked(connection, order_id)
            if record is None or record.status is not AdmissionStatus.UNPLACED:
                return
            await publish_rejections(record.commands)
            await connection.execute(DELETE_ADMISSION, {"order_id": order_id})


async def _locked(connection: AsyncConnection, order_id: str) -> AdmissionRecord | None:
    row = (await connection.execute(LOCK_ADMISSION, {"order_id": order_id})).first()
    return None if row is None else AdmissionRecord(**row._mapping)


def _record(command: Command, outcome: Outcome, replace: bool = False) -> dict[str, object]:
    """A command's `processed_commands` row; `replace` overrules an outcome recorded before."""
    of_command = {"command_id": command.command_id, "order_id": command.order_id, "type": command.type.value}
    return {**of_command, "outcome": outcome.kind.value, "detail": outcome.detail, "replace": replace}


class SlotGate:
    """Where this bridge's placements wait for a slot, one at a time in arrival order, asking
    again when a lifecycle anywhere releases one (PostgreSQL NOTIFY) or every second."""

    def __init__(self, settings: Settings) -> None:
        self._released = asyncio.Event()
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._listener = ChannelListener(settings, ADMISSIONS_CHANNEL, self._released.set)

    def idle(self) -> bool:
        """No placement waits here: one registering now may take a free slot without overtaking."""
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

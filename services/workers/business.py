"""The six business functions of the lifecycle (and the refund that compensates a charge).

Each business function calls `flaky_call()` first, as the contract says, then does its own database
work. Every one of them is safe to run again: an activity attempt may time out after its work
committed, and the retry must not do it twice.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Coroutine
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Update, func, select, update
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped
from sqlmodel import col

from services.workers import faults
from shared.contracts import Address, OrderState, PlaceOrder
from shared.db import Order, Payment, insert_order, transaction

Sessions = async_sessionmaker[AsyncSession]
T = TypeVar("T")

MAX_TOTAL_QUANTITY = 10_000


class OrderInvalid(Exception):
    """The order breaks a business rule: retrying cannot help."""


class ChargeOutcome(StrEnum):
    CHARGED = "charged"
    ALREADY_CHARGED = "already_charged"


class PaymentVoided(Exception):
    """The order stopped (and voided its payment) before this charge attempt could commit."""


class PaymentStatus(StrEnum):
    CHARGED = "charged"
    REFUNDED = "refunded"
    VOIDED = "voided"  # the order stopped before any charge committed: nothing may charge it now


def _to_its_end(work: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """`work` (a business function's database part) goes on to its end even if the attempt is
    abandoned meanwhile (a sibling attempt won, or its timeout cut it): its transaction commits or
    rolls back as it would have. Cut mid-statement, the connection would be thrown away and a later
    attempt would have to open a new one."""
    return asyncio.shield(work)


async def order_received(sessions: Sessions, order: PlaceOrder) -> None:
    """Insert the order; receiving it again changes nothing."""
    await faults.flaky_call()
    await _to_its_end(_insert_order(sessions, order))


async def _insert_order(sessions: Sessions, order: PlaceOrder) -> None:
    async with transaction(sessions) as session:
        await insert_order(session, order, OrderState.RECEIVED)


async def order_validated(sessions: Sessions, order_id: str) -> None:
    """Check the stored order against the business rules and mark it validated."""
    await faults.flaky_call()
    await _to_its_end(_validate(sessions, order_id))


async def _validate(sessions: Sessions, order_id: str) -> None:
    async with transaction(sessions) as session:
        order = await session.get(Order, order_id)
        if order is None:
            # not a business verdict: the insert has not landed where we read; a retry may see it
            raise LookupError(f"order {order_id} is not in the database")
        await _check_rules(session, order)
        await session.execute(_stamp_once(order_id, col(Order.validated_at)))


async def _check_rules(session: AsyncSession, order: Order) -> None:
    skus = Counter(item["sku"] for item in order.items)
    repeated = sorted(sku for sku, count in skus.items() if count > 1)
    if repeated:
        raise OrderInvalid(f"each SKU may appear once; repeated: {', '.join(repeated)}")
    total = sum(item["qty"] for item in order.items)
    if total > MAX_TOTAL_QUANTITY:
        raise OrderInvalid(f"total quantity {total} exceeds {MAX_TOTAL_QUANTITY}")
    owner = await session.scalar(
        select(col(Payment.order_id)).where(col(Payment.payment_id) == order.payment_id)
    )
    if owner is not None and owner != order.id:
        raise OrderInvalid(f"payment {order.payment_id} already belongs to order {owner}")


async def payment_charged(
    sessions: Sessions, *, payment_id: str, order_id: str, amount_cents: int
) -> ChargeOutcome:
    """Charge once per `payment_id`.

    The insert claims the payment id inside the transaction: a concurrent second call waits on the
    unique key until the first commits, then finds the row and counts as already processed. The
    charge is recorded (committed) only when it succeeded; a failure rolls the claim back. A
    payment voided by `payment_refunded` is never charged: an attempt abandoned by a stopping
    order that runs on anyway raises `PaymentVoided` instead.
    """
    await faults.flaky_call()
    return await _to_its_end(
        _charge(sessions, payment_id=payment_id, order_id=order_id, amount_cents=amount_cents)
    )


async def _charge(sessions: Sessions, *, payment_id: str, order_id: str, amount_cents: int) -> ChargeOutcome:
    async with transaction(sessions) as session:
        claimed = await session.scalar(
            _new_payment(payment_id, order_id, amount_cents, PaymentStatus.CHARGED)
            .on_conflict_do_nothing(index_elements=[Payment.payment_id])
            .returning(col(Payment.payment_id))
        )
        if claimed:
            return ChargeOutcome.CHARGED
        existing = (
            await session.execute(
                select(col(Payment.order_id), col(Payment.status)).where(
                    col(Payment.payment_id) == payment_id
                )
            )
        ).one()
    if existing.order_id != order_id:
        raise OrderInvalid(f"payment {payment_id} already belongs to order {existing.order_id}")
    if existing.status != PaymentStatus.CHARGED.value:
        raise PaymentVoided(f"payment {payment_id} is {existing.status}: order {order_id} has stopped")
    return ChargeOutcome.ALREADY_CHARGED


def _new_payment(payment_id: str, order_id: str, amount_cents: int, status: PaymentStatus) -> Insert:
    """A payment row claiming `payment_id`; its conflict clause says what an existing claim does."""
    return insert(Payment).values(
        payment_id=payment_id, order_id=order_id, amount_cents=amount_cents, status=status.value
    )


async def package_prepared(sessions: Sessions, order_id: str) -> None:
    await faults.flaky_call()
    await _to_its_end(_stamp(sessions, order_id, col(Order.package_prepared_at)))


async def carrier_dispatched(sessions: Sessions, order_id: str, address: Address) -> str:
    """Hand the package to the carrier for `address`; returns the tracking number (kept across
    retries and re-dispatches)."""
    await faults.flaky_call()
    return await _to_its_end(_dispatch(sessions, order_id, address))


async def _dispatch(sessions: Sessions, order_id: str, address: Address) -> str:
    async with transaction(sessions) as session:
        tracking_number: str | None = await session.scalar(
            update(Order)
            .where(col(Order.id) == order_id)
            .values(
                address=address.model_dump(),
                tracking_number=func.coalesce(col(Order.tracking_number), _new_tracking_number()),
                dispatched_at=func.coalesce(col(Order.dispatched_at), func.now()),
            )
            .returning(col(Order.tracking_number))
        )
    if tracking_number is None:
        raise LookupError(f"order {order_id} is not in the database")
    return tracking_number


def _new_tracking_number() -> str:
    return "TRK-" + secrets.token_hex(6).upper()


async def order_shipped(sessions: Sessions, order_id: str) -> None:
    await faults.flaky_call()
    await _to_its_end(_stamp(sessions, order_id, col(Order.shipped_at)))


async def _stamp(sessions: Sessions, order_id: str, column: Mapped[datetime | None]) -> None:
    async with transaction(sessions) as session:
        await session.execute(_stamp_once(order_id, column))


def _stamp_once(order_id: str, column: Mapped[datetime | None]) -> Update:
    """Set a milestone's timestamp the first time only, so a repeated step keeps the first."""
    return update(Order).where(col(Order.id) == order_id, column.is_(None)).values({column: func.now()})


async def payment_refunded(sessions: Sessions, *, payment_id: str, order_id: str, amount_cents: int) -> bool:
    """Compensate a charge, for an order that stops after its charge step began. Not one of the
    contract's six business steps, so no fault injection: a refund must get through.

    Returns True if a charge was refunded. If no charge has committed, the payment id is claimed
    as voided instead (False), so a charge attempt still running somewhere cannot commit after us:
    the same unique key orders the two, whichever reaches it first.
    """
    async with transaction(sessions) as session:
        status = await session.scalar(
            _new_payment(payment_id, order_id, amount_cents, PaymentStatus.VOIDED)
            .values(charged_at=None, voided_at=func.now())
            .on_conflict_do_update(
                index_elements=[Payment.payment_id],
                set_={
                    "status": PaymentStatus.REFUNDED.value,
                    "refunded_at": func.coalesce(col(Payment.refunded_at), func.now()),
                },
                # only this order's charge is ours to refund; a voided or refunded row stays
                where=(col(Payment.order_id) == order_id)
                & (col(Payment.status) == PaymentStatus.CHARGED.value),
            )
            .returning(col(Payment.status))
        )
        if status is None:  # the row was there and not a charge of ours to refund
            status = await session.scalar(
                select(col(Payment.status)).where(
                    col(Payment.payment_id) == payment_id, col(Payment.order_id) == order_id
                )
            )
    return status == PaymentStatus.REFUNDED.value

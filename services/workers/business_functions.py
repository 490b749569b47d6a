"""The lifecycle's six business functions on PostgreSQL, each calling `flaky_call()` first, and the
refund of a charge. Each is safe to run again: an attempt may time out after its work committed."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped
from sqlmodel import col

from services.workers import faults
from services.workers.activity_interface import ChargeOutcome, PaymentInput
from shared.contracts import Address, OrderItem, OrderState, PlaceOrder
from shared.db import Order, Payment, insert_order, transaction

Sessions = async_sessionmaker[AsyncSession]
T = TypeVar("T")

MAX_TOTAL_QUANTITY = 10_000


class OrderInvalid(Exception):
    """The order breaks a business rule: retrying cannot help."""


class PaymentVoided(Exception):
    """The order stopped (and voided its payment) before this charge attempt could commit."""


class PaymentStatus(StrEnum):
    CHARGED = "charged"
    REFUNDED = "refunded"
    VOIDED = "voided"  # the order stopped before any charge committed: nothing may charge it now


async def _to_its_end(sessions: Sessions, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """`work` in a transaction shielded from a cut attempt: cut mid-statement, it costs its connection."""

    async def in_transaction() -> T:
        async with transaction(sessions) as session:
            return await work(session)

    return await asyncio.shield(in_transaction())


async def order_received(sessions: Sessions, order: PlaceOrder) -> None:
    """Insert the order; receiving it again changes nothing."""
    await faults.flaky_call()
    await _to_its_end(sessions, lambda session: insert_order(session, order, OrderState.RECEIVED))


async def order_validated(sessions: Sessions, order_id: str) -> None:
    """Check the stored order against the business rules and mark it validated."""
    await faults.flaky_call()
    await _to_its_end(sessions, lambda session: _validate(session, order_id))


async def _validate(session: AsyncSession, order_id: str) -> None:
    order = await session.get(Order, order_id)
    if order is None:
        # not a business verdict: the insert has not landed where we read; a retry may see it
        raise LookupError(f"order {order_id} is not in the database")
    items = [OrderItem.model_validate(item) for item in order.items]
    skus = Counter(item.sku for item in items)
    repeated = sorted(sku for sku, count in skus.items() if count > 1)
    if repeated:
        raise OrderInvalid(f"each SKU may appear once; repeated: {', '.join(repeated)}")
    total = sum(item.qty for item in items)
    if total > MAX_TOTAL_QUANTITY:
        raise OrderInvalid(f"total quantity {total} exceeds {MAX_TOTAL_QUANTITY}")
    payment = await session.get(Payment, order.payment_id)
    if payment is not None and payment.order_id != order.id:
        raise OrderInvalid(f"payment {order.payment_id} already belongs to order {payment.order_id}")
    await _stamp(session, order_id, col(Order.validated_at))


async def payment_charged(sessions: Sessions, payment: PaymentInput) -> ChargeOutcome:
    """Charge once per `payment_id` (its insert claims it); one voided by `payment_refunded` never is."""
    await faults.flaky_call()
    return await _to_its_end(sessions, lambda session: _charge(session, payment))


async def _charge(session: AsyncSession, payment: PaymentInput) -> ChargeOutcome:
    claimed = await session.scalar(
        _new_payment(payment, PaymentStatus.CHARGED)
        .on_conflict_do_nothing(index_elements=[Payment.payment_id])
        .returning(col(Payment.payment_id))
    )
    if claimed:
        return ChargeOutcome.CHARGED
    existing = await session.get_one(Payment, payment.payment_id)
    if existing.order_id != payment.order_id:
        raise OrderInvalid(f"payment {payment.payment_id} already belongs to order {existing.order_id}")
    if existing.status != PaymentStatus.CHARGED.value:
        raise PaymentVoided(
            f"payment {payment.payment_id} is {existing.status}: order {payment.order_id} has stopped"
        )
    return ChargeOutcome.ALREADY_CHARGED


def _new_payment(payment: PaymentInput, status: PaymentStatus) -> Insert:
    """A payment row claiming the payment id; its conflict clause says what an existing claim does."""
    return insert(Payment).values(**payment.model_dump(), status=status.value)


async def package_prepared(sessions: Sessions, order_id: str) -> None:
    await faults.flaky_call()
    await _to_its_end(sessions, lambda session: _stamp(session, order_id, col(Order.package_prepared_at)))


async def carrier_dispatched(sessions: Sessions, order_id: str, address: Address) -> str:
    """Hand the package to the carrier for `address`; the tracking number, kept across re-dispatches."""
    await faults.flaky_call()
    dispatch = (
        update(Order)
        .where(col(Order.id) == order_id)
        .values(
            address=address.model_dump(),
            tracking_number=func.coalesce(col(Order.tracking_number), "TRK-" + secrets.token_hex(6).upper()),
            dispatched_at=func.coalesce(col(Order.dispatched_at), func.now()),
        )
        .returning(col(Order.tracking_number))
    )
    tracking_number: str | None = await _to_its_end(sessions, lambda session: session.scalar(dispatch))
    if tracking_number is None:
        raise LookupError(f"order {order_id} is not in the database")
    return tracking_number


async def order_shipped(sessions: Sessions, order_id: str) -> None:
    await faults.flaky_call()
    await _to_its_end(sessions, lambda session: _stamp(session, order_id, col(Order.shipped_at)))


async def _stamp(session: AsyncSession, order_id: str, column: Mapped[datetime | None]) -> None:
    """Set a milestone's timestamp the first time only, so a repeated step keeps the first."""
    await session.execute(
        update(Order).where(col(Order.id) == order_id, column.is_(None)).values({column: func.now()})
    )


async def payment_refunded(sessions: Sessions, payment: PaymentInput) -> bool:
    """True if it refunds the charge; with none committed, it voids the payment so that no late attempt
    charges it. Not a business step (it must get through): no fault injection."""
    return await _to_its_end(sessions, lambda session: _refund(session, payment))


async def _refund(session: AsyncSession, payment: PaymentInput) -> bool:
    ours = col(Payment.order_id) == payment.order_id
    status = await session.scalar(
        _new_payment(payment, PaymentStatus.VOIDED)
        .values(charged_at=None, voided_at=func.now())
        .on_conflict_do_update(
            index_elements=[Payment.payment_id],
            set_={
                "status": PaymentStatus.REFUNDED.value,
                "refunded_at": func.coalesce(col(Payment.refunded_at), func.now()),
            },
            # only this order's charge is ours to refund; a voided or refunded row stays
            where=ours & (col(Payment.status) == PaymentStatus.CHARGED.value),
        )
        .returning(col(Payment.status))
    )
    if status is None:  # the row was there and not a charge of ours to refund
        status = await session.scalar(
            select(col(Payment.status)).where(col(Payment.payment_id) == payment.payment_id, ours)
        )
    return status == PaymentStatus.REFUNDED.value

"""The lifecycle's six business functions on PostgreSQL, each calling `flaky_call()` first, and the
refund of a charge. Each is safe to run again: an attempt may time out after its work committed."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlmodel import col

from services.workers import faults
from services.workers.activity_interface import ChargeOutcome, PaymentInput
from shared.contracts import Address, OrderItem, OrderState, PlaceOrder
from shared.db import INSERT_ORDER, Order, Payment, order_row, transaction

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


async def _to_its_end(sessions: Sessions, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """`work` in a transaction shielded from a cut attempt: cut mid-statement, it costs its connection."""

    async def in_transaction() -> T:
        async with transaction(sessions) as session:
            return await work(await session.connection())  # Core: no ORM loading, no identity map

    return await asyncio.shield(in_transaction())


THE_ORDER = col(Order.id) == bindparam("order_id")
# statements built once (their cache keys too); a milestone's timestamp is set the first time only
STAMP_VALIDATED, STAMP_PREPARED, STAMP_SHIPPED = (
    update(Order).where(THE_ORDER, column.is_(None)).values({column: func.now()})
    for column in (col(Order.validated_at), col(Order.package_prepared_at), col(Order.shipped_at))
)
ORDER_TO_VALIDATE = (
    select(col(Order.items), col(Order.payment_id), col(Order.validated_at), col(Payment.order_id))
    .outerjoin(Payment, col(Payment.payment_id) == col(Order.payment_id))
    .where(THE_ORDER)
)
CLAIM_PAYMENT = insert(Payment).on_conflict_do_nothing(index_elements=[Payment.payment_id])
PAYMENT_HOLDER = select(col(Payment.order_id), col(Payment.status)).where(
    col(Payment.payment_id) == bindparam("payment_id")
)
DISPATCH = (
    update(Order)
    .where(THE_ORDER)
    .values(
        address=bindparam("address"),
        tracking_number=func.coalesce(col(Order.tracking_number), bindparam("tracking_number")),
        dispatched_at=func.coalesce(col(Order.dispatched_at), func.now()),
    )
    .returning(col(Order.tracking_number))
)


async def order_received(sessions: Sessions, order: PlaceOrder) -> None:
    """Insert the order; receiving it again changes nothing."""
    await faults.flaky_call()
    row = order_row(order, OrderState.RECEIVED)
    await _to_its_end(sessions, lambda connection: connection.execute(INSERT_ORDER, row))


async def order_validated(sessions: Sessions, order_id: str) -> None:
    """Check the stored order against the business rules and mark it validated."""
    await faults.flaky_call()
    await _to_its_end(sessions, lambda connection: _validate(connection, order_id))


async def _validate(connection: AsyncConnection, order_id: str) -> None:
    order = (await connection.execute(ORDER_TO_VALIDATE, {"order_id": order_id})).one_or_none()
    if order is None:
        # not a business verdict: the insert has not landed where we read; a retry may see it
        raise LookupError(f"order {order_id} is not in the database")
    stored_items, payment_id, validated_at, payer = order
    items = [OrderItem.model_validate(item) for item in stored_items]
    repeated = sorted(sku for sku, count in Counter(item.sku for item in items).items() if count > 1)
    if repeated:
        raise OrderInvalid(f"each SKU may appear once; repeated: {', '.join(repeated)}")
    total = sum(item.qty for item in items)
    if total > MAX_TOTAL_QUANTITY:
        raise OrderInvalid(f"total quantity {total} exceeds {MAX_TOTAL_QUANTITY}")
    if payer not in (None, order_id):
        raise OrderInvalid(f"payment {payment_id} already belongs to order {payer}")
    if validated_at is None:  # a re-run that finds it stamped writes nothing
        await connection.execute(STAMP_VALIDATED, {"order_id": order_id})


async def payment_charged(sessions: Sessions, payment: PaymentInput) -> ChargeOutcome:
    """Charge once per `payment_id` (its insert claims it); one voided by `payment_refunded` never is."""
    await faults.flaky_call()
    return await _to_its_end(sessions, lambda connection: _charge(connection, payment))


async def _charge(connection: AsyncConnection, payment: PaymentInput) -> ChargeOutcome:
    claim = await connection.execute(CLAIM_PAYMENT, {**payment.model_dump(), "status": PaymentStatus.CHARGED})
    if claim.rowcount:
        return ChargeOutcome.CHARGED
    holder = (await connection.execute(PAYMENT_HOLDER, {"payment_id": payment.payment_id})).one()
    if holder.order_id != payment.order_id:
        raise OrderInvalid(f"payment {payment.payment_id} already belongs to order {holder.order_id}")
    if holder.status != PaymentStatus.CHARGED.value:
        raise PaymentVoided(
            f"payment {payment.payment_id} is {holder.status}: order {payment.order_id} has stopped"
        )
    return ChargeOutcome.ALREADY_CHARGED


async def package_prepared(sessions: Sessions, order_id: str) -> None:
    await faults.flaky_call()
    await _to_its_end(sessions, lambda connection: connection.execute(STAMP_PREPARED, {"order_id": order_id}))


async def carrier_dispatched(sessions: Sessions, order_id: str, address: Address) -> str:
    """Hand the package to the carrier for `address`; the tracking number, kept across re-dispatches."""
    await faults.flaky_call()
    new_number = "TRK-" + secrets.token_hex(6).upper()  # kept only if the order has none yet
    dispatch = {"order_id": order_id, "address": address.model_dump(), "tracking_number": new_number}
    tracking_number = await _to_its_end(sessions, lambda connection: connection.scalar(DISPATCH, dispatch))
    if tracking_number is None:
        raise LookupError(f"order {order_id} is not in the database")
    return tracking_number


async def order_shipped(sessions: Sessions, order_id: str) -> None:
    await faults.flaky_call()
    await _to_its_end(sessions, lambda connection: connection.execute(STAMP_SHIPPED, {"order_id": order_id}))


async def payment_refunded(sessions: Sessions, payment: PaymentInput) -> bool:
    """True if it refunds the charge; with none committed, it voids the payment so that no late attempt
    charges it. Not a business step (it must get through): no fault injection."""
    return await _to_its_end(sessions, lambda connection: _refund(connection, payment))


async def _refund(connection: AsyncConnection, payment: PaymentInput) -> bool:
    ours = col(Payment.order_id) == payment.order_id
    status = await connection.scalar(
        insert(Payment)
        .values(**payment.model_dump(), status=PaymentStatus.VOIDED, charged_at=None, voided_at=func.now())
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
        status = await connection.scalar(
            select(col(Payment.status)).where(col(Payment.payment_id) == payment.payment_id, ours)
        )
    return status == PaymentStatus.REFUNDED.value

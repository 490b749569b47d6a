"""The offered load: N orders placed at a given rate, open loop, into any system under test.

A system under test (the orderflow pipeline, or the bare-Temporal baseline) places one order when
asked and reports what becomes of it into the run's `Ledger` by itself (admission, approval
requests, endings). Placements are paced by the clock, not by the answers: each goes out at its
scheduled time, and at most `MAX_IN_FLIGHT` wait for an answer at once, so a system that takes
placements slower than offered slows the load down rather than piling up requests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from bench.measure import Ledger
from shared import local_issuer
from shared.contracts import Actor, Address, OrderItem, PlaceOrder, Role
from shared.settings import Settings
from testsupport.orders import place_order, unique_id

MAX_IN_FLIGHT = 64
ADDRESS = Address(name="Bench", line1="1 Load Street", city="Testville", postal_code="12345", country="DE")
ITEMS = [OrderItem(sku="SKU-1", qty=1, unit_price_cents=999)]
# the people the bench's AMQP publisher (a delegate, see `BENCH_PUBLISHER`) acts for: nobody
# approves an order they placed
BENCH_CUSTOMER = Actor(subject="bench-customer", roles=frozenset({Role.CUSTOMER}))
BENCH_REVIEWER = Actor(subject="bench-reviewer", roles=frozenset({Role.REVIEWER}))
BENCH_PUBLISHER: dict[str, Any] = {
    "amqp_publisher_roles": {"guest": list(Role)},
    "amqp_delegates": ["guest"],
    # a flash sale's orders come from many customers, the bench's from one
    "api_write_rate_limit": "1000/second",
}
"""Settings that make the local broker account (the bench's publisher) a delegate with every role,
and let the bench's one customer place at a crowd's rate through the gateway."""


class Shed(Exception):
    """The system refused a placement at the door (backlog full): a negative confirm or a 503."""


class SystemUnderTest(Protocol):
    async def place(self, order_id: str) -> None:
        """Returns once the system has taken the order; raises `Shed` if it refused it."""

    def cpu_seconds(self) -> dict[str, float]:
        """CPU used so far, by kind of process."""


@dataclass(frozen=True)
class Load:
    orders: int
    rate: float
    """Orders offered per second."""
    burst: bool = False

    def __str__(self) -> str:
        return f"{'burst of ' if self.burst else ''}{self.orders} orders at {self.rate:g}/s"


async def offer(system: SystemUnderTest, ledger: Ledger, load: Load) -> None:
    """Place `load.orders` orders at `load.rate` per second; returns when every placement has
    been answered."""
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
    placements: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    for index in range(load.orders):
        await asyncio.sleep(max(0.0, started + index / load.rate - time.monotonic()))
        await in_flight.acquire()
        placement = asyncio.create_task(_place(system, ledger, unique_id("bench")))
        placements.add(placement)

        def answered(done: asyncio.Task[None]) -> None:
            placements.discard(done)
            in_flight.release()

        placement.add_done_callback(answered)
    await asyncio.gather(*placements)


async def _place(system: SystemUnderTest, ledger: Ledger, order_id: str) -> None:
    clock = ledger.offer(order_id)
    try:
        await system.place(order_id)
    except Shed:
        clock.shed = True
    except Exception as error:  # noqa: BLE001 (any failure to place is a finding of the run, counted)
        clock.error = f"{type(error).__name__}: {error}"
    else:
        clock.accepted_at = time.monotonic()


def place_command(order_id: str, issuers: bool = True) -> PlaceOrder:
    """Every order of the bench: one item, one address, placed by the bench's customer (`issuers`
    False: by the publisher itself, for a revision from before commands named their issuer)."""
    return place_order(order_id, issued_by=BENCH_CUSTOMER if issuers else None, items=ITEMS, address=ADDRESS)


def customer_token(settings: Settings) -> dict[str, str]:
    """The gateway's `Authorization` for the bench's customer, from the system's local issuer."""
    token = local_issuer.mint_token(settings, BENCH_CUSTOMER.subject, BENCH_CUSTOMER.roles)
    return {"Authorization": f"Bearer {token}"}

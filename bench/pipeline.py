"""orderflow itself as the system under test: the `make run` stack on a database and RabbitMQ
vhost of its own, placements over AMQP or the REST gateway, approvals through the command queue.

A subscriber on `orders.events` feeds every event into the run's `Ledger` (times, seq checks) and
approves each order when its `awaiting_approval` event arrives, as a reviewer would (or a given
number of seconds later, as a person would). Its CPU is its processes' and the PostgreSQL and
RabbitMQ servers'.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx
from aio_pika.abc import AbstractIncomingMessage

from bench.load import BENCH_PUBLISHER, BENCH_REVIEWER, Shed, customer_token, place_command
from bench.measure import Ledger, cpu_by_kind, server_pids
from devstack.stack import (
    RUN_DIR,
    Stack,
    TemporalDevServer,
    drop_vhost,
    free_port,
    isolated_settings,
    running_stack,
    service_of,
    with_local_issuer,
    with_payload_keys,
)
from shared import broker
from shared.contracts import ApproveOrder, EventType, OrderEvent
from shared.schema import drop_database
from shared.settings import Settings
from testsupport.orders import approve_order

BENCH_NAME = "orderflow_bench"
WARM_UP_SECONDS = 2.0  # let the workers start polling before the clock starts


class Entry(StrEnum):
    """Where placements go in."""

    BROKER = "broker"  # PlaceOrder straight to orders.commands, publisher confirms
    API = "api"  # POST /orders on the REST gateway


@dataclass(frozen=True)
class Variant:
    """How business-step attempts run: PARALLEL_ATTEMPTS:ATTEMPT_TIMEOUT_SECONDS."""

    parallel_attempts: int
    attempt_timeout: float

    @classmethod
    def parse(cls, text: str) -> Variant:
        parallel, timeout = text.split(":")
        return cls(int(parallel), float(timeout))

    @classmethod
    def shipped(cls) -> Variant:
        settings = Settings()
        return cls(settings.parallel_attempts, settings.activity_attempt_timeout_seconds)

    def spec(self) -> str:
        return f"{self.parallel_attempts}:{self.attempt_timeout:g}"

    def applied_to(self, settings: Settings) -> Settings:
        return settings.model_copy(
            update={
                "parallel_attempts": self.parallel_attempts,
                "activity_attempt_timeout_seconds": self.attempt_timeout,
            }
        )

    def __str__(self) -> str:
        return f"{self.parallel_attempts}x {self.attempt_timeout:g}s"


@dataclass(frozen=True)
class PipelineConfig:
    variant: Variant
    bridges: int = 1
    workers: int = 1
    entry: Entry = Entry.BROKER
    tree: Path | None = None
    """A checkout of another revision whose services run instead of this tree's."""
    review_seconds: float = 0.0
    """How long the reviewer takes to approve an order awaiting approval."""

    def __str__(self) -> str:
        scale = f" {self.bridges}b{self.workers}w" if (self.bridges, self.workers) != (1, 1) else ""
        review = f" review {self.review_seconds:g}s" if self.review_seconds else ""
        tree = f" @{self.tree.name}" if self.tree else ""
        return f"{self.variant}{scale}{review}{tree}"

    def settings(self, temporal_port: int, name: str) -> Settings:
        """Settings on a database and vhost called `name`, made anew."""
        api_port = free_port()
        isolated = with_local_issuer(
            with_payload_keys(isolated_settings(Settings(**BENCH_PUBLISHER), name), RUN_DIR)
        )
        return self.variant.applied_to(isolated).model_copy(
            update={
                "temporal_address": f"127.0.0.1:{temporal_port}",
                "api_port": api_port,
                "api_url": f"http://127.0.0.1:{api_port}",
                "bridge_instances": self.bridges,
                "worker_instances": self.workers,
            }
        )


def approve_command(order_id: str, issuers: bool = True) -> ApproveOrder:
    return approve_order(order_id, issued_by=BENCH_REVIEWER if issuers else None)


class Pipeline:
    """The running stack, placing orders through `entry` and following them on `orders.events`."""

    def __init__(
        self,
        stack: Stack,
        topology: broker.Topology,
        ledger: Ledger,
        api: httpx.AsyncClient | None,
        review_seconds: float,
        issuers: bool,
        servers: dict[str, int],
    ) -> None:
        self._stack = stack
        self._servers = servers
        self._issuers = issuers  # False for a revision from before commands named their issuer
        self._topology = topology
        self._ledger = ledger
        self._api = api
        self._review_seconds = review_seconds
        self._approvals: set[asyncio.Task[None]] = set()

    async def place(self, order_id: str) -> None:
        if self._api is None:
            try:
                await broker.publish_command(self._topology, place_command(order_id, self._issuers))
            except broker.CommandRefused as refused:  # the broker's negative confirm: backlog full
                raise Shed(str(refused)) from refused
            return
        command = place_command(order_id)
        answer = await self._api.post(
            "/orders",
            json={"order_id": order_id, **command.payload.model_dump(mode="json", exclude_none=True)},
        )
        if answer.status_code == 503:
            raise Shed(answer.headers.get("retry-after", ""))
        answer.raise_for_status()

    def cpu_seconds(self) -> dict[str, float]:
        return cpu_by_kind(self._stack.pids() | self._servers, service_of)

    async def on_event(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        event = OrderEvent.model_validate_json(message.body)
        clock = self._ledger.observe(
            event.order_id, event.type, seq=event.seq, event_id=event.event_id, occurred_at=event.occurred_at
        )
        if clock is not None and event.type is EventType.AWAITING_APPROVAL and not clock.approval_requested:
            clock.approval_requested = True
            self._approve(event.order_id)

    def _approve(self, order_id: str) -> None:
        task = asyncio.create_task(self._review(order_id))
        self._approvals.add(task)
        task.add_done_callback(self._approvals.discard)

    async def _review(self, order_id: str) -> None:
        await asyncio.sleep(self._review_seconds)
        await broker.publish_command(self._topology, approve_command(order_id, self._issuers))


@asynccontextmanager
async def running_pipeline(config: PipelineConfig, ledger: Ledger) -> AsyncIterator[Pipeline]:
    """A fresh stack (its own Temporal dev server, database and vhost) with the bench subscribed."""
    temporal = TemporalDevServer(port=free_port(), ui_port=free_port(), ui=False)
    # benchmarks run side by side do not meet, nor the two trees of one benchmark
    name = f"{BENCH_NAME}_{os.getpid()}{'_beside' if config.tree else ''}"
    settings = config.settings(temporal.port, name)
    await drop_database(settings.database_url)
    with tempfile.NamedTemporaryFile("w", prefix="orderflow-bench-", suffix=".log", delete=False) as log:
        print(f"  (service logs: {log.name})", file=sys.stderr)
        async with AsyncExitStack() as exits:
            exits.push_async_callback(drop_database, settings.database_url)
            exits.callback(drop_vhost, name)
            stack = await exits.enter_async_context(
                running_stack(settings, temporal=temporal, log=log, code=config.tree)
            )
            connection = await broker.connect(settings, "bench")
            exits.push_async_callback(connection.close)
            channel, topology = await broker.open_channel(connection)
            api = None
            if config.entry is Entry.API:
                api = await exits.enter_async_context(
                    httpx.AsyncClient(base_url=settings.api_url, timeout=30, headers=customer_token(settings))
                )
            issuers = config.tree is None or (config.tree / "shared" / "authorization.py").exists()
            servers = server_pids(settings)
            pipeline = Pipeline(stack, topology, ledger, api, config.review_seconds, issuers, servers)
            events = await channel.declare_queue(exclusive=True, auto_delete=True)
            await events.bind(topology.events, routing_key="order.#")
            await events.consume(pipeline.on_event)
            await asyncio.sleep(WARM_UP_SECONDS)
            yield pipeline

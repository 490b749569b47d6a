"""Helpers for the REST gateway's and the CLI's tests: bearer tokens, sample orders, read-model rows,
a command tap, a vhost of their own and a gateway process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractQueue
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from services.api.app import create_app
from services.stack import free_port, running_stack, service_environment
from shared import broker, local_issuer
from shared.admissions import AdmissionStatus
from shared.contracts import EventType, OrderState, Role
from shared.db import Admission, AuditEvent, Order, create_engine, transaction
from shared.settings import Settings

GATEWAY_START_TIMEOUT_SECONDS = 30.0

ADDRESS: dict[str, Any] = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}
ITEMS: list[dict[str, Any]] = [{"sku": "BOOK-1", "qty": 2, "unit_price_cents": 1250}]


def bearer(settings: Settings, subject: str, *roles: Role) -> dict[str, str]:
    """The `Authorization` header of a token the local issuer (which the tests' gateways trust)
    gives `subject` with `roles`."""
    token = local_issuer.mint_token(settings, subject, roles)
    return {"Authorization": f"Bearer {token}"}


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid4().hex[:12]}"


def order_body(**overrides: Any) -> dict[str, Any]:
    """A valid `POST /orders` body."""
    return {"payment_id": unique_id("pay"), "items": ITEMS, "address": ADDRESS, **overrides}


def closed_port() -> int:
    """A local port nothing listens on (bound and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextmanager
def own_vhost(settings: Settings, name: str) -> Iterator[Settings]:
    """`settings` moved to a new RabbitMQ vhost called `name` plus a random suffix, where nothing is
    declared yet and nothing of other tests arrives; deleted afterwards."""
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl is needed to create a vhost"
    vhost = f"{name}_{uuid4().hex[:8]}"
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        [ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    try:
        yield settings.model_copy(update={"amqp_url": settings.amqp_url.rsplit("/", 1)[0] + "/" + vhost})
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], check=True, capture_output=True)


@asynccontextmanager
async def gateway(
    settings: Settings, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gateway app, its lifespan running, sending `headers` (a `bearer`
    token, say) with every request."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers) as client,
    ):
        yield client


@contextmanager
def gateway_process(settings: Settings, log_path: Path) -> Iterator[str]:
    """`python -m services.api` serving `settings` on a free port, its output in `log_path`; yields
    its URL once it answers."""
    port = closed_port()
    env = {
        **service_environment(settings),
        "ORDERFLOW_API_HOST": "127.0.0.1",
        "ORDERFLOW_API_PORT": str(port),
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.api"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT_SECONDS
        while not answers(url):
            if process.poll() is not None:
                raise AssertionError(f"the gateway exited with {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not answer within {GATEWAY_START_TIMEOUT_SECONDS} s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz").status_code == httpx.codes.OK
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def gateway_url(
    settings: Settings,
    db_sessions: async_sessionmaker[AsyncSession],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A gateway process on the test database, vhost and dev server of this session."""
    with gateway_process(settings, tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield url


@asynccontextmanager
async def running_system(settings: Settings, name: str) -> AsyncIterator[Settings]:
    """api, bridge, workers and audit as processes (the `make run` launcher), the API on a free
    port, against the session's database, vhost and dev server. These tests check what happens,
    not how fast (bench/ measures that with the shipped timings): a slow machine must not turn an
    order into a timeout, and a person-like client gets time to act."""
    port = free_port()
    system_settings = settings.model_copy(
        update={
            "api_port": port,
            "api_url": f"http://127.0.0.1:{port}",
            "review_window_seconds": 30.0,
            "lifecycle_deadline_seconds": 45.0,
        }
    )
    await release_slots_left_held(settings)
    with tempfile.NamedTemporaryFile("w+", prefix=f"orderflow-{name}-", suffix=".log", delete=False) as log:
        try:
            async with running_stack(system_settings, temporal=None, log=log):
                yield system_settings
        finally:
            print(f"service logs: {log.name}")  # the services' own logs, for whoever reads a failure


async def release_slots_left_held(settings: Settings) -> None:
    """Admission slots earlier tests of the session left held: their lifecycles were never run, or
    ran on a task queue no worker polls any more, so the reconciler cannot end them, and they
    would take a system's admission bound (12 by default) before its first order."""
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(Admission)
                .where(col(Admission.status).in_([AdmissionStatus.ADMITTING, AdmissionStatus.RUNNING]))
                .values(status=AdmissionStatus.ENDED.value, ended_at=func.now())
            )
    finally:
        await engine.dispose()


@pytest_asyncio.fixture
async def command_queue(
    broker_channel: tuple[AbstractChannel, broker.Topology],
) -> AsyncIterator[AbstractQueue]:
    """A private queue that receives every command published to `orders.commands`."""
    channel, topology = broker_channel
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(topology.commands, routing_key="order.#")
    yield queue


async def insert_order(
    sessions: async_sessionmaker[AsyncSession],
    order_id: str,
    state: OrderState,
    created_at: datetime | None = None,
    placed_by: str | None = None,
) -> None:
    """A row of the orders read model, as the business functions and the projection write it."""
    created_at = created_at or datetime.now(UTC)
    async with transaction(sessions) as session:
        session.add(
            Order(
                id=order_id,
                payment_id=f"pay-{order_id}",
                items=ITEMS,
                address=ADDRESS,
                amount_cents=2500,
                state=state.value,
                placed_by=placed_by,
                created_at=created_at,
                updated_at=created_at,
            )
        )


async def insert_events(
    sessions: async_sessionmaker[AsyncSession], order_id: str, types_by_seq: dict[int, EventType]
) -> None:
    """Rows of the audit table, as the audit consumer writes them."""
    async with transaction(sessions) as session:
        for seq, event_type in types_by_seq.items():
            session.add(
                AuditEvent(
                    event_id=uuid4(),
                    order_id=order_id,
                    seq=seq,
                    type=event_type.value,
                    occurred_at=datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=seq),
                    data={"seq_was": seq},
                )
            )


@contextmanager
def serving_page(page: bytes) -> Iterator[int]:
    """An HTML page served on a free port of 127.0.0.1 (another origin than the gateway's); its port."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()

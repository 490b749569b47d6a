"""The bridge, workers and audit consumer, each a process as `make run` starts it: /healthz and
/readyz beside /metrics on its metrics port; /readyz names each server that went away; and SIGTERM
while work is in hand stops it within the drain time, under the platforms' 10 s.

A server "goes away" behind a `Link`, a TCP proxy of the test's own between the service and the real
server, which the test can cut (connections closed, new ones refused) or stall (connections held
open, nothing gets through: a hung server)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy.engine import make_url

from devstack.stack import METRICS_PORT_SETTINGS, free_port, instance_environment, service_environment
from shared.contracts import EventType, Role
from shared.settings import Settings
from test_startup_errors import DEPENDENCIES_OF
from testsupport.amqp import Broker, own_queues, publish
from testsupport.gateway import bearer
from testsupport.orders import example_event, place_order, unique_id
from testsupport.polling import eventually

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 60.0
PLATFORM_GRACE_SECONDS = 10.0  # Docker's and Kubernetes' default between SIGTERM and SIGKILL
# the drain tests' own drain time: what they check is the same as with the shipped 8 s, in less time
SHORT_DRAIN = {"drain_seconds": 2}


class Link:
    """A TCP proxy on a local port (`listen_port`, else a free one) to `host:port`, which the test
    can cut or stall."""

    def __init__(self, host: str, port: int, listen_port: int = 0) -> None:
        self._target = (host, port)
        self._listen_port = listen_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._sockets: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.held_back = 0  # reads not passed on since the link stalled

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self._listen_port)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.cut()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def cut(self) -> None:
        """Close every connection through the link and refuse new ones."""
        assert self._server is not None
        self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        for writer in self._sockets:
            writer.close()
        await self._server.wait_closed()

    def stall(self) -> None:
        """Let nothing more through, either way, and hold the connections open."""
        self._flowing.clear()

    async def _connect(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self._sockets.append(client)
        await self._flowing.wait()
        server_reader, server = await asyncio.open_connection(*self._target)
        self._sockets.append(server)
        for source, sink in ((client_reader, server), (server_reader, client)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            while data := await source.read(65536):
                if not self._flowing.is_set():
                    self.held_back += 1
                    await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        sink.close()


@asynccontextmanager
async def links(settings: Settings) -> AsyncIterator[tuple[Settings, dict[str, Link]]]:
    """`settings` with the broker, database and Temporal each reached through a `Link`."""
    amqp = urlsplit(settings.amqp_url)
    database = make_url(settings.database_url)
    temporal_host, _, temporal_port = settings.temporal_address.rpartition(":")
    assert amqp.hostname and amqp.port and database.host and database.port
    async with (
        Link(amqp.hostname, amqp.port) as broker,
        Link(database.host, database.port) as database_link,
        Link(temporal_host, int(temporal_port)) as temporal,
    ):
        linked = settings.model_copy(
            update={
                "amqp_url": amqp._replace(
                    netloc=amqp.netloc.replace(f":{amqp.port}", f":{broker.port}")
                ).geturl(),
                "database_url": database.set(port=database_link.port).render_as_string(hide_password=False),
                "temporal_address": f"127.0.0.1:{temporal.port}",
            }
        )
        yield linked, {"broker": broker, "database": database_link, "temporal": temporal}


@dataclass
class ServiceProcess:
    process: asyncio.subprocess.Process
    url: str  # of its metrics and probes
    log: Path

    def logged(self, event: str) -> bool:
        return f'"event": "{event}"' in self.log.read_text()

    async def at_work(self) -> None:
        """Once it is ready and its own work has started (for a consumer: consuming)."""
        await self.ready()

        async def working() -> bool:
            return self.logged("consuming") or self.logged("workers started")

        await eventually(working, START_TIMEOUT_SECONDS, what="work started")

    async def answer(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            return await client.get(path)

    async def ready(self) -> httpx.Response:
        """/readyz once it answers 200 (or fail, showing the service's log)."""

        async def answered() -> httpx.Response | None:
            assert self.process.returncode is None, f"the service exited:\n{self.log.read_text()}"
            try:
                response = await self.answer("/readyz")
            except httpx.TransportError:
                return None
            return response if response.status_code == httpx.codes.OK else None

        return await eventually(answered, START_TIMEOUT_SECONDS, what="readiness")

    async def stopped_by_sigterm(self) -> float:
        """Seconds from SIGTERM to its exit."""
        started = time.monotonic()
        self.process.terminate()
        await asyncio.wait_for(self.process.wait(), 2 * PLATFORM_GRACE_SECONDS)
        return time.monotonic() - started


@asynccontextmanager
async def service_process(settings: Settings, service: str, log: Path) -> AsyncIterator[ServiceProcess]:
    """`python -m services.<service>` with `settings`, its probes (and metrics) on a free port."""
    port = free_port()
    env = instance_environment(service_environment(settings), service, port)
    if service == "api":
        env |= {"ORDERFLOW_API_HOST": "127.0.0.1", "ORDERFLOW_API_PORT": str(port)}
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{service}", cwd=REPO, env=env, stdout=output, stderr=output
        )
    try:
        yield ServiceProcess(process, f"http://127.0.0.1:{port}", log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("service", list(METRICS_PORT_SETTINGS))
async def test_a_service_is_alive_and_ready_on_its_metrics_port(
    settings: Settings, migrated_database: str, tmp_path: Path, service: str
) -> None:
    async with service_process(own_queues(settings), service, tmp_path / "service.log") as running:
        readiness = await running.ready()
        alive = await running.answer("/healthz")
        metrics = await running.answer("/metrics")
        await running.at_work()
        stopping_took = await running.stopped_by_sigterm()

    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert readiness.json()["ready"] is True
    assert tuple(readiness.json()["checks"]) == DEPENDENCIES_OF[service]
    assert all(check["ok"] for check in readiness.json()["checks"].values())
    assert "process_cpu_seconds_total" in metrics.text
    assert running.process.returncode == 0, running.log.read_text()
    assert stopping_took < PLATFORM_GRACE_SECONDS


async def test_readyz_names_each_server_that_goes_away(
    settings: Settings, migrated_database: str, tmp_path: Path
) -> None:
    async with (
        links(own_queues(settings)) as (linked, link),
        service_process(linked, "bridge", tmp_path / "bridge.log") as bridge,
    ):
        await bridge.at_work()

        gone: list[str] = []
        for server in ("database", "temporal", "broker"):
            await link[server].cut()
            gone.append(server)

            async def failing_as_cut() -> httpx.Response | None:
                # a closed connection is noticed when its end reaches the service's event loop
                readiness = await bridge.answer("/readyz")
                return readiness if sorted(readiness.json()["failed"]) == sorted(gone) else None

            readiness = await eventually(failing_as_cut, what=f"/readyz failing {gone}")
            assert readiness.status_code == 503
            assert all(readiness.json()["checks"][name]["detail"] for name in gone)
        alive = await bridge.answer("/healthz")  # not ready, but alive: nothing a restart would mend

    assert alive.status_code == 200


async def test_a_service_waits_for_a_server_that_comes_up_while_it_starts(
    settings: Settings, migrated_database: str, tmp_path: Path
) -> None:
    database = make_url(settings.database_url)
    assert database.host and database.port
    port = free_port()
    later = own_queues(settings).model_copy(
        update={"database_url": database.set(port=port).render_as_string(hide_password=False)}
    )
    async with service_process(later, "audit", tmp_path / "audit.log") as audit:

        async def waiting() -> bool:
            return audit.logged("waiting for a server")

        await eventually(waiting, START_TIMEOUT_SECONDS)
        readiness = await audit.answer("/readyz")  # answered meanwhile
        async with Link(database.host, database.port, listen_port=port):
            await audit.at_work()

    assert (readiness.status_code, readiness.json()["failed"]) == (503, ["database"])


@pytest.mark.parametrize("service", ["bridge", "audit"])
async def test_a_consumer_stops_within_the_drain_time_on_sigterm_while_busy(
    settings: Settings, migrated_database: str, broker_channel: Broker, tmp_path: Path, service: str
) -> None:
    """A message in hand whose work hangs (its database stalled) is given up after the drain time
    (left unacked: the broker hands it out again), and the service exits within the platform's
    grace."""
    own = own_queues(settings).model_copy(update=SHORT_DRAIN)
    queue = own.placement_queue if service == "bridge" else own.audit_queue
    async with (
        links(own) as (linked, link),
        service_process(linked, service, tmp_path / f"{service}.log") as consumer,
    ):
        await consumer.at_work()
        link["database"].stall()
        order_id = unique_id("drain")
        if service == "bridge":
            await publish(broker_channel, place_order(order_id))
        else:
            await publish(broker_channel, example_event(order_id, 1, EventType.QUEUED))
        channel, _ = broker_channel

        async def taken() -> bool:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count == 0

        await eventually(taken, what="the message in hand")
        seconds = await consumer.stopped_by_sigterm()

        assert seconds < PLATFORM_GRACE_SECONDS, consumer.log.read_text()
        # given back at the drain's end, or by the handler itself once it saw the stop
        given_back = (
            "drain time over: messages left for redelivery",
            "stopping; message left for redelivery",
        )
        assert any(map(consumer.logged, given_back)), consumer.log.read_text()


async def test_the_gateway_stops_within_the_drain_time_on_sigterm_while_busy(
    settings: Settings, migrated_database: str, tmp_path: Path
) -> None:
    """A request whose database stalled is cancelled after the drain time, and the gateway exits
    within the platform's grace."""
    async with (
        links(settings.model_copy(update=SHORT_DRAIN)) as (linked, link),
        service_process(linked, "api", tmp_path / "api.log") as gateway,
        httpx.AsyncClient(base_url=gateway.url, headers=bearer(settings, "rita", Role.REVIEWER)) as client,
    ):
        await gateway.ready()
        link["database"].stall()
        request = asyncio.create_task(client.get(f"/orders/{unique_id('drain')}", timeout=None))

        async def held() -> bool:
            return link["database"].held_back > 0

        await eventually(held, what="the request waiting for the database")
        seconds = await gateway.stopped_by_sigterm()
        request.cancel()

    assert seconds < PLATFORM_GRACE_SECONDS, gateway.log.read_text()
    assert "timeout graceful shutdown exceeded" in gateway.log.read_text()

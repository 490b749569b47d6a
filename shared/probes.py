"""What a service tells the platform running it: alive (`/healthz`: its event loop runs), ready (`/readyz`:
the servers it uses answer) and its metrics (`/metrics`); the gateway serves them from its app, the other
services from a small HTTP server beside their work (`serve_endpoints`)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import structlog
from aio_pika.abc import AbstractChannel
from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from shared.readiness import DependencyCheck, Readiness

CHECK_TIMEOUT_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 5.0
# a loop that cannot run a callback within this is stuck (a blocking call, say)
LIVENESS_TIMEOUT_SECONDS = 2.0

log = structlog.get_logger(__name__)
T = TypeVar("T")
Check = Callable[[], Awaitable[str]]
"""Says how a dependency answered; raises when it did not."""


class DependencyUnavailable(Exception):
    """A dependency the work needs is down: the gateway answers 503, /readyz names it."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"{dependency} unavailable: {reason}")
        self.dependency = dependency
        self.reason = reason


def describe(error: BaseException) -> str:
    """A one-line reason for an error, even one without a message or with several lines (SQLAlchemy's)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class LazyConnection(Generic[T]):
    """A connection opened once, on the first `get()` that finds its dependency up."""

    def __init__(
        self,
        name: str,
        open_: Callable[[], Awaitable[T]],
        close: Callable[[T], Awaitable[None]] | None = None,  # None: the Temporal client has no close()
    ) -> None:
        self.name = name
        self._open = open_
        self._close = close
        self._value: T | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        """The open connection; raises `DependencyUnavailable` if it cannot be opened now."""
        async with self._lock:  # one connection attempt at a time, not one per request
            if self._value is None:
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                        self._value = await self._open()
                except Exception as error:  # whatever stops the connection, the dependency is unavailable
                    raise DependencyUnavailable(self.name, describe(error)) from error
        return self._value

    async def close(self) -> None:
        value, self._value = self._value, None
        if value is not None and self._close is not None:
            await self._close(value)


async def readiness(checks: Mapping[str, Check]) -> Readiness:
    """Every check at once, each within `CHECK_TIMEOUT_SECONDS`."""
    results = await asyncio.gather(*(run_check(check) for check in checks.values()))
    by_name = dict(zip(checks, results, strict=True))
    failed = [name for name, result in by_name.items() if not result.ok]
    return Readiness(ready=not failed, checks=by_name, failed=failed)


async def run_check(check: Check) -> DependencyCheck:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            return DependencyCheck(ok=True, detail=await check())
    except DependencyUnavailable as error:
        return DependencyCheck(ok=False, detail=error.reason)
    # a readiness check reports every failure rather than raising it
    except Exception as error:  # noqa: BLE001
        return DependencyCheck(ok=False, detail=describe(error))


async def channel_open(channel: AbstractChannel) -> str:
    if channel.is_closed:
        raise DependencyUnavailable("broker", "the channel is closed (reconnecting)")
    return "channel open"


async def database_answers(engine: AsyncEngine) -> str:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return "SELECT 1 answered"


async def temporal_serving(client: Client) -> str:
    if not await client.service_client.check_health(timeout=timedelta(seconds=CHECK_TIMEOUT_SECONDS)):
        raise DependencyUnavailable("temporal", "the workflow service is not serving")
    return "workflow service serving"


def serve_endpoints(host: str, port: int, checks: Mapping[str, Check]) -> None:
    """Serve /metrics, /healthz and /readyz from a thread (port 0: not at all; a port taken: logged)."""
    if not port:
        return
    endpoints = Endpoints(checks, asyncio.get_running_loop())
    try:
        server = make_server(host, port, endpoints, _ThreadingServer, _QuietHandler)
    except OSError as error:
        log.error("metrics and probes not served", host=host, port=port, error=str(error))
        return
    threading.Thread(target=server.serve_forever, name="endpoints", daemon=True).start()
    log.info("serving metrics and probes", url=f"http://{host}:{port}", paths=sorted(endpoints.paths))


class Endpoints:
    """The WSGI app of a service's endpoints; it runs in the server's threads, the checks on the loop."""

    def __init__(self, checks: Mapping[str, Check], loop: asyncio.AbstractEventLoop) -> None:
        self._checks = checks
        self._loop = loop
        self._metrics = make_wsgi_app(REGISTRY)
        self.paths = {"/healthz": self._liveness, "/readyz": self._readiness}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            answer: Iterable[bytes] = self._metrics(environ, start_response)
            return answer
        endpoint = self.paths.get(path)
        if endpoint is None:
            return _json(start_response, "404 Not Found", {"detail": "Not Found"})
        ok, body = endpoint()
        return _json(start_response, "200 OK" if ok else "503 Service Unavailable", body)

    def _liveness(self) -> tuple[bool, object]:
        answered = threading.Event()
        try:
            self._loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # the loop is closed
            return False, {"status": "stopped"}
        if not answered.wait(LIVENESS_TIMEOUT_SECONDS):
            return False, {"status": "event loop not answering"}
        return True, {"status": "ok"}

    def _readiness(self) -> tuple[bool, object]:
        try:
            checked = asyncio.run_coroutine_threadsafe(readiness(self._checks), self._loop)
            result = checked.result(timeout=CHECK_TIMEOUT_SECONDS + LIVENESS_TIMEOUT_SECONDS)
        except (RuntimeError, TimeoutError):  # the loop is closed, or stuck
            process = DependencyCheck(ok=False, detail="its event loop does not answer")
            result = Readiness(ready=False, checks={"process": process}, failed=["process"])
        return result.ready, result.model_dump(mode="json")


def _json(start_response: StartResponse, status: str, body: object) -> list[bytes]:
    content = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(content)))])
    return [content]


class _ThreadingServer(ThreadingWSGIServer):  # a daemon thread per request
    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]  # IPv4 or 6
        super().__init__(address, handler)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Not a line on stderr per probe."""

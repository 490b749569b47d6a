"""The REST gateway in tests: bearer tokens, the app in-process or as a process, and a page of
another origin; its fixture is loaded as a pytest plugin (tests/conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from devstack.stack import service_environment
from services.api.app import create_app
from shared import local_issuer
from shared.contracts import Role
from shared.settings import Settings

GATEWAY_START_TIMEOUT_SECONDS = 30.0


def bearer(settings: Settings, subject: str, *roles: Role) -> dict[str, str]:
    """The `Authorization` header of a token the local issuer (which the tests' gateways trust)
    gives `subject` with `roles`."""
    token = local_issuer.mint_token(settings, subject, roles)
    return {"Authorization": f"Bearer {token}"}


def closed_port() -> int:
    """A local port nothing listens on (bound and released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


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
def gateway_settings(settings: Settings) -> Settings:
    """What `gateway_url` serves: the test database, vhost and dev server of this session (a test
    module may override it)."""
    return settings


@pytest.fixture(scope="module")
def gateway_url(
    gateway_settings: Settings,
    db_sessions: async_sessionmaker[AsyncSession],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A gateway process serving `gateway_settings`."""
    with gateway_process(gateway_settings, tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield url


def serving_page(page: bytes) -> AbstractContextManager[int]:
    """An HTML page served on a free port of 127.0.0.1 (another origin than the gateway's); its port."""
    return serving(lambda: page, "text/html")


@contextmanager
def serving(body: Callable[[], bytes], content_type: str) -> Iterator[int]:
    """An HTTP server on a free port of 127.0.0.1 answering every GET with `body()`; its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            content = body()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()

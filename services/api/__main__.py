"""`python -m services.api`: serve the REST gateway on `api_host:api_port`."""

from __future__ import annotations

import asyncio
import socket
from types import FrameType
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE

from services.api.app import create_app
from services.api.auth import AuthNotConfigured, TokenVerifier
from shared.logging import configure_logging
from shared.settings import Settings
from shared.startup import CLOSE_SECONDS, Dependency, exit_unless_ended_within, reach_or_exit
from shared.temporal import temporal_settings_or_exit
from shared.tracing import configure_tracing


def main() -> None:
    settings = temporal_settings_or_exit("api")
    configure_logging(settings, "api")
    try:
        TokenVerifier.from_settings(settings)  # checked before serving: the gateway never runs open
    except AuthNotConfigured as error:
        structlog.get_logger(__name__).critical(f"the gateway cannot start: {error}")
        raise SystemExit(2) from None
    asyncio.run(reach_or_exit(settings, "api", tuple(Dependency)))
    configure_tracing("api")  # before the app: FastAPI traces once a provider is installed
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # uvicorn's loggers stay on the JSON handler configured above
        timeout_graceful_shutdown=settings.drain_seconds,
        **serving_options(settings),
    )
    server = DrainingServer(config, app)
    server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)  # uvicorn logged why (the port is taken, say)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, told to stop, ends event streams, drains, and exits at most a second later."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            exit_unless_ended_within(self._app.state.settings.drain_seconds + CLOSE_SECONDS)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.state.event_feed.stopping.set()  # else the drain would wait for each stream's client
        await super().shutdown(sockets)


def serving_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config's keyword arguments: HTTPS given a certificate; X-Forwarded-* only from the proxies."""
    proxies = [address.strip() for address in settings.api_forwarded_allow_ips.split(",") if address.strip()]
    return {
        "ssl_certfile": settings.api_tls_cert_file,
        "ssl_keyfile": settings.api_tls_key_file,
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies or None,
    }


if __name__ == "__main__":
    main()

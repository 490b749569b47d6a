"""`python -m services.api`: serve the REST gateway on `api_host:api_port`."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import structlog
import uvicorn

from services.api.app import create_app
from services.api.auth import AuthNotConfigured, TokenVerifier
from shared.logging import configure_logging
from shared.settings import Settings
from shared.temporal import temporal_settings_or_exit
from shared.tracing import configure_tracing


def main() -> None:
    settings = temporal_settings_or_exit("api")
    configure_logging(settings, "api")
    try:
        TokenVerifier.from_settings(settings)  # checked before serving: the gateway never runs open
    except AuthNotConfigured as error:
        structlog.get_logger().critical(f"the gateway cannot start: {error}")
        raise SystemExit(2) from None
    configure_tracing(settings, "api")  # before the app: FastAPI traces once a provider is installed
    # log_config=None keeps uvicorn's loggers on the JSON handler configured above
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        **serving_options(settings),
    )


class ServingOptions(TypedDict):
    ssl_certfile: Path | None
    ssl_keyfile: Path | None
    proxy_headers: bool
    forwarded_allow_ips: list[str] | None


def serving_options(settings: Settings) -> ServingOptions:
    """HTTPS when given a certificate; X-Forwarded-For/-Proto believed only from the configured
    proxies (uvicorn would trust 127.0.0.1 by default)."""
    proxies = [address.strip() for address in settings.api_forwarded_allow_ips.split(",") if address.strip()]
    return {
        "ssl_certfile": settings.api_tls_cert_file,
        "ssl_keyfile": settings.api_tls_key_file,
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies or None,
    }


if __name__ == "__main__":
    main()

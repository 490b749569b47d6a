"""`python -m services.api`: serve the REST gateway on `api_host:api_port`."""

from __future__ import annotations

import uvicorn

from services.api.app import create_app
from shared.logging import configure_logging, settings_or_exit
from shared.tracing import configure_tracing


def main() -> None:
    settings = settings_or_exit("api")
    configure_logging(settings, "api")
    configure_tracing(settings, "api")  # before the app: FastAPI traces once a provider is installed
    # log_config=None keeps uvicorn's loggers on the JSON handler configured above
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_config=None)


if __name__ == "__main__":
    main()

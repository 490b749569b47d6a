"""`python -m services.bridge`: run the command bridge until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio

from temporalio.runtime import Runtime

from services.bridge.consumer import CONSUMER_NAME, run_bridge
from shared.consuming import stop_on_signals
from shared.logging import configure_logging
from shared.metrics import serve_metrics, temporal_runtime
from shared.temporal import temporal_settings_or_exit
from shared.tracing import configure_tracing


async def main() -> None:
    settings = temporal_settings_or_exit(CONSUMER_NAME)
    configure_logging(settings, CONSUMER_NAME)
    configure_tracing(settings, CONSUMER_NAME)
    Runtime.set_default(temporal_runtime(settings.bridge_metrics_port))
    serve_metrics(settings.metrics_host, settings.bridge_metrics_port)
    await run_bridge(settings, stop_on_signals())


if __name__ == "__main__":
    asyncio.run(main())

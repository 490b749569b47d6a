"""`python -m services.bridge`: run the command bridge until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio

from temporalio.runtime import Runtime

from services.bridge.consumer import CONSUMER_NAME, run_bridge
from shared.logging import configure_logging
from shared.metrics import temporal_runtime
from shared.startup import Dependency, started
from shared.temporal import temporal_settings_or_exit
from shared.tracing import configure_tracing


async def main() -> None:
    settings = temporal_settings_or_exit(CONSUMER_NAME)
    configure_logging(settings, CONSUMER_NAME)
    configure_tracing(CONSUMER_NAME)
    Runtime.set_default(temporal_runtime(settings.bridge_metrics_port))
    async with started(settings, CONSUMER_NAME, settings.bridge_metrics_port, tuple(Dependency)) as service:
        await run_bridge(settings, service.stop)


if __name__ == "__main__":
    asyncio.run(main())

"""`python -m services.workers`: the order and shipping workers, until SIGINT or SIGTERM."""

import asyncio
import logging
import warnings

import structlog
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryFilter

from services.workers.worker import running_workers
from shared.logging import configure_logging
from shared.metrics import temporal_runtime
from shared.startup import Dependency, started
from shared.temporal import temporal_settings_or_exit
from shared.tracing import configure_tracing

# once per hung attempt, not worth a line each: Core cut it (or a loser) at its timeout, and it reported late
ROUTINE = "Tried to complete untracked local activity"


def core_logs() -> LoggingConfig:
    """Core's log lines into our JSON logs (they went to stderr as text), without the routine ones."""
    core = logging.getLogger("temporalio.core")
    core.addFilter(lambda record: ROUTINE not in record.getMessage())
    warnings.filterwarnings("ignore", message="Cannot find activity to cancel")
    levels = TelemetryFilter(core_level="WARN", other_level="ERROR")
    return LoggingConfig(filter=levels, forwarding=LogForwardingConfig(logger=core))


async def main() -> None:
    settings = temporal_settings_or_exit("workers")
    configure_logging(settings, "workers")
    configure_tracing("workers")
    Runtime.set_default(temporal_runtime(settings.worker_metrics_port, logging=core_logs()))
    log = structlog.get_logger(__name__)
    async with started(settings, "workers", settings.worker_metrics_port, tuple(Dependency)) as service:
        client = await service.connections.temporal.get()
        async with running_workers(client, settings):
            log.info("workers started", task_queues=[settings.order_task_queue, settings.shipping_task_queue])
            await service.stop.wait()
    log.info("workers stopped")


if __name__ == "__main__":
    asyncio.run(main())

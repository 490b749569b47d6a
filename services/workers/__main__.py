"""`python -m services.workers`: the order and shipping workers, until SIGINT or SIGTERM."""

import asyncio
import logging
import signal
import warnings

import structlog
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryFilter,
)

from services.workers.worker import running_workers
from shared.logging import configure_logging
from shared.metrics import serve_metrics, temporal_runtime
from shared.temporal import connect_temporal, temporal_settings_or_exit
from shared.tracing import configure_tracing

# Expected once per hung attempt, so not worth a line each: Core cuts the attempt at its timeout,
# and the attempt (cancelled) or a loser (finished just as it was cancelled) reports back late.
ROUTINE = ("Tried to complete untracked local activity",)


def core_logs() -> LoggingConfig:
    """Core's log lines into our JSON logs (they went to stderr as text), without the routine ones."""
    core = logging.getLogger("temporalio.core")
    core.addFilter(lambda record: not any(routine in record.getMessage() for routine in ROUTINE))
    warnings.filterwarnings("ignore", message="Cannot find activity to cancel")
    levels = TelemetryFilter(core_level="WARN", other_level="ERROR")
    return LoggingConfig(filter=levels, forwarding=LogForwardingConfig(logger=core))


async def main() -> None:
    settings = temporal_settings_or_exit("workers")
    configure_logging(settings, "workers")
    configure_tracing(settings, "workers")
    Runtime.set_default(temporal_runtime(settings.worker_metrics_port, logging=core_logs()))
    serve_metrics(settings.metrics_host, settings.worker_metrics_port)
    log = structlog.get_logger()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    client = await connect_temporal(settings)
    async with running_workers(client, settings):
        log.info("workers started", task_queues=[settings.order_task_queue, settings.shipping_task_queue])
        await stop.wait()
    log.info("workers stopped")


if __name__ == "__main__":
    asyncio.run(main())

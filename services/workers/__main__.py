"""`python -m services.workers`: the order and shipping workers, until SIGINT or SIGTERM."""

import asyncio
import signal

import structlog

from services.workers.worker import running_workers
from shared.logging import configure_logging
from shared.settings import get_settings
from shared.temporal import connect_temporal


async def main() -> None:
    settings = get_settings()
    configure_logging(settings, "workers")
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

"""`python -m services.audit`: run the audit consumer until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio

from services.audit.consumer import CONSUMER_NAME, run_audit
from shared.logging import configure_logging, settings_or_exit
from shared.startup import Dependency, started
from shared.tracing import configure_tracing


async def main() -> None:
    settings = settings_or_exit(CONSUMER_NAME)
    configure_logging(settings, CONSUMER_NAME)
    configure_tracing(CONSUMER_NAME)
    dependencies = (Dependency.BROKER, Dependency.DATABASE)
    async with started(settings, CONSUMER_NAME, settings.audit_metrics_port, dependencies) as service:
        await run_audit(settings, service.stop)


if __name__ == "__main__":
    asyncio.run(main())

"""`python -m services.audit`: run the audit consumer until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio

from services.audit.consumer import CONSUMER_NAME, run_audit
from shared.consuming import stop_on_signals
from shared.logging import configure_logging, settings_or_exit
from shared.metrics import serve_metrics
from shared.tracing import configure_tracing


async def main() -> None:
    settings = settings_or_exit(CONSUMER_NAME)
    configure_logging(settings, CONSUMER_NAME)
    configure_tracing(settings, CONSUMER_NAME)
    serve_metrics(settings.metrics_host, settings.audit_metrics_port)
    await run_audit(settings, stop_on_signals())


if __name__ == "__main__":
    asyncio.run(main())

"""`python -m services.audit`: run the audit consumer until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio

from services.audit.consumer import CONSUMER_NAME, run_audit
from shared.consuming import stop_on_signals
from shared.logging import configure_logging
from shared.settings import get_settings


async def main() -> None:
    settings = get_settings()
    configure_logging(settings, CONSUMER_NAME)
    await run_audit(settings, stop_on_signals())


if __name__ == "__main__":
    asyncio.run(main())

"""`python -m services.bridge`: run the command bridge until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio

from services.bridge.consumer import CONSUMER_NAME, run_bridge
from shared.consuming import stop_on_signals
from shared.logging import configure_logging
from shared.settings import get_settings


async def main() -> None:
    settings = get_settings()
    configure_logging(settings, CONSUMER_NAME)
    await run_bridge(settings, stop_on_signals())


if __name__ == "__main__":
    asyncio.run(main())

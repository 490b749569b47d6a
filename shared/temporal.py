"""The Temporal client every service uses: pydantic models cross the workflow boundary as JSON."""

from __future__ import annotations

import asyncio

import structlog
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from shared.settings import Settings

CONNECT_PATIENCE_SECONDS = 60.0


async def connect_temporal(settings: Settings, patience: float = CONNECT_PATIENCE_SECONDS) -> Client:
    """Connect, waiting up to `patience` seconds for a server that is still starting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
            )
        except (RuntimeError, RPCError) as error:
            if loop.time() > deadline:
                raise
            structlog.get_logger().info(
                "waiting for temporal", address=settings.temporal_address, error=str(error)
            )
            await asyncio.sleep(1.0)

"""The Temporal client every service uses: pydantic models cross the workflow boundary as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog
from temporalio.client import Client, Interceptor
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from shared.settings import Settings
from shared.tracing import tracing_enabled

CONNECT_PATIENCE_SECONDS = 60.0


async def connect_temporal(
    settings: Settings,
    patience: float = CONNECT_PATIENCE_SECONDS,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    """Connect, waiting up to `patience` seconds for a server that is still starting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=pydantic_data_converter,
                interceptors=interceptors,
            )
        except (RuntimeError, RPCError) as error:
            if loop.time() > deadline:
                raise
            structlog.get_logger().info(
                "waiting for temporal", address=settings.temporal_address, error=str(error)
            )
            await asyncio.sleep(1.0)


def tracing_interceptors() -> list[TracingInterceptor]:
    """For a client or a worker while tracing is on (`shared.tracing`): a span for each workflow
    start, signal, workflow run and activity, and the trace carried along in Temporal's headers."""
    return [TracingInterceptor()] if tracing_enabled() else []

"""The Temporal client every service uses: pydantic models cross the workflow boundary as JSON,
encrypted (`shared.codec`), over a connection configured the way Temporal's own tools are.

Where and how to connect comes from Temporal's environment configuration (`temporalio.envconfig`):
`TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY`, `TEMPORAL_TLS*`, `TEMPORAL_GRPC_META_*`
and a profile (`TEMPORAL_PROFILE`) of the config file (`TEMPORAL_CONFIG_FILE`, by default
`~/.config/temporalio/temporal.toml`). What it leaves unsaid, address and namespace, comes from
`ORDERFLOW_TEMPORAL_ADDRESS` and `ORDERFLOW_TEMPORAL_NAMESPACE`: the local defaults.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import structlog
from temporalio.client import Client, Interceptor
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.converter import DataConverter
from temporalio.envconfig import ClientConfig, ClientConnectConfig
from temporalio.service import RPCError

from shared.codec import PayloadKeysError, encrypted_data_converter, payload_keyring
from shared.logging import configure_logging, settings_or_exit
from shared.settings import Settings
from shared.tracing import tracing_enabled

CONNECT_PATIENCE_SECONDS = 60.0


def connect_config(settings: Settings, environ: Mapping[str, str] | None = None) -> ClientConnectConfig:
    """`Client.connect`'s target, namespace, TLS, API key and gRPC metadata: Temporal's environment
    configuration (`environ`, the process's by default) over orderflow's address and namespace."""
    defaults: ClientConnectConfig = {
        "target_host": settings.temporal_address,
        "namespace": settings.temporal_namespace,
    }
    return defaults | ClientConfig.load_client_connect_config(override_env_vars=environ)


def temporal_data_converter(settings: Settings) -> DataConverter:
    return encrypted_data_converter(payload_keyring(settings))


async def connect_temporal(
    settings: Settings,
    patience: float = CONNECT_PATIENCE_SECONDS,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    """Connect, waiting up to `patience` seconds for a server that is still starting."""
    config = connect_config(settings)
    data_converter = temporal_data_converter(settings)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await Client.connect(**config, data_converter=data_converter, interceptors=interceptors)
        except (RuntimeError, RPCError) as error:
            if loop.time() > deadline:
                raise
            structlog.get_logger().info(
                "waiting for temporal", address=config.get("target_host"), error=str(error)
            )
            await asyncio.sleep(1.0)


def temporal_settings_or_exit(service: str) -> Settings:
    """`settings_or_exit` for a service that talks to Temporal: without a payload key it would
    write order data in plaintext, so it does not start (one log line, exit code 2)."""
    settings = settings_or_exit(service)
    try:
        payload_keyring(settings)
    except PayloadKeysError as error:
        configure_logging(settings, service)
        structlog.get_logger().critical(f"invalid settings: {error}")
        raise SystemExit(2) from None
    return settings


def tracing_interceptors() -> list[TracingInterceptor]:
    """For a client or a worker while tracing is on (`shared.tracing`): a span for each workflow
    start, signal, workflow run and activity, and the trace carried along in Temporal's headers."""
    return [TracingInterceptor()] if tracing_enabled() else []

"""The Temporal client every service uses: pydantic models as encrypted JSON (`shared.codec`).
Temporal's own environment configuration (`TEMPORAL_ADDRESS`, `TEMPORAL_TLS*`, `TEMPORAL_PROFILE`,
...) says how to connect; what it leaves unsaid, address and namespace, orderflow's settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

from temporalio.client import Client, Interceptor
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.envconfig import ClientConfig, ClientConnectConfig
from temporalio.service import RPCError

from shared.codec import PayloadKeysError, encrypted_data_converter, payload_keyring
from shared.logging import configure_logging, settings_or_exit, stop_starting
from shared.reachability import CONNECT_PATIENCE_SECONDS, patiently
from shared.settings import Settings
from shared.tracing import tracing_enabled


def connect_config(settings: Settings, environ: Mapping[str, str] | None = None) -> ClientConnectConfig:
    """`Client.connect`'s arguments: Temporal's configuration from `environ` over orderflow's defaults."""
    defaults: ClientConnectConfig = {
        "target_host": settings.temporal_address,
        "namespace": settings.temporal_namespace,
    }
    return defaults | ClientConfig.load_client_connect_config(override_env_vars=environ)


async def connect_temporal(
    settings: Settings, patience: float = CONNECT_PATIENCE_SECONDS, interceptors: Sequence[Interceptor] = ()
) -> Client:
    """Connect, waiting up to `patience` seconds for a server that is still starting."""
    config = connect_config(settings)
    data_converter = encrypted_data_converter(payload_keyring(settings))
    connecting = partial(Client.connect, **config, data_converter=data_converter, interceptors=interceptors)
    return await patiently(
        connecting, (RuntimeError, RPCError), patience, "waiting for temporal", address=config["target_host"]
    )


def temporal_settings_or_exit(service: str) -> Settings:
    """`settings_or_exit`, and no start without a payload key (it would write order data in plaintext)."""
    settings = settings_or_exit(service)
    try:
        payload_keyring(settings)
    except PayloadKeysError as error:
        configure_logging(settings, service)
        stop_starting(f"invalid settings: {error}")
    return settings


def tracing_interceptors() -> list[TracingInterceptor]:
    """While tracing is on: spans for workflow starts, signals, runs and activities, carried in headers."""
    return [TracingInterceptor()] if tracing_enabled() else []

"""Traces (OpenTelemetry) along an order's path, carried over AMQP in the W3C `traceparent` header and
configured by OpenTelemetry's environment variables: unless they name an exporter or an OTLP endpoint,
no tracer provider is installed and every hook here does nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from aio_pika.abc import AbstractIncomingMessage, HeadersType
from opentelemetry import propagate, trace
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_SDK_DISABLED,
)
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.logging import stop_starting

SERVICE_NAME_PREFIX = "orderflow-"
EXPORTERS = ("otlp", "console")

_tracer = trace.get_tracer(__name__)


def configure_tracing(service: str) -> None:
    """Install a tracer provider for the exporters the environment names, if it names any."""
    exporters = _exporter_names()
    if not exporters or os.environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return
    if unknown := set(exporters) - set(EXPORTERS):
        known = ", ".join((*EXPORTERS, "none"))
        stop_starting(
            f"invalid settings: {OTEL_TRACES_EXPORTER}: unknown {', '.join(sorted(unknown))} (known: {known})"
        )
    # the environment's OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name
    default = Resource.create({SERVICE_NAME: SERVICE_NAME_PREFIX + service})
    provider = TracerProvider(resource=default.merge(OTELResourceDetector().detect()))
    for name in exporters:
        # batched: spans are exported from a thread of their own, off the request and message paths
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)


def _exporter_names() -> list[str]:
    """`OTEL_TRACES_EXPORTER` (comma-separated; `none` for none), else `otlp` if an OTLP endpoint is set."""
    named = os.environ.get(OTEL_TRACES_EXPORTER)
    if named is None:
        endpoints = (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT)
        return ["otlp"] if any(os.environ.get(endpoint) for endpoint in endpoints) else []
    names = (name.strip() for name in named.split(","))
    return [name for name in names if name not in ("", "none")]


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        # one line per span, beside the JSON log lines
        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    # imported only here: a process that does not export over OTLP need not load it
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers and TLS from the OTEL_EXPORTER_OTLP_* variables


def tracing_enabled() -> bool:
    """Whether a tracer provider was installed (by `configure_tracing`, or by a test)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def trace_headers() -> HeadersType:
    """AMQP headers that carry the current span's context (`traceparent`) to the consumer."""
    headers: HeadersType = {}
    if tracing_enabled():
        propagate.inject(headers)
    return headers


@contextmanager
def consuming(message: AbstractIncomingMessage, queue: str) -> Iterator[None]:
    """Handle `message` in a span that continues the trace of whoever published it."""
    if not tracing_enabled():
        yield
        return
    headers = {key: value for key, value in (message.headers or {}).items() if isinstance(value, str)}
    with _tracer.start_as_current_span(
        f"process {queue}",
        context=propagate.extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": message.exchange or "",
            "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
            "messaging.destination.subscription.name": queue,
            "messaging.message.id": message.message_id or "",
        },
    ):
        yield


def record_failure(error: BaseException) -> None:
    """Mark the current span failed (a message requeued or dead-lettered)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, repr(error)))

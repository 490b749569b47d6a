"""Traces (OpenTelemetry) along an order's whole path: gateway → broker → bridge → Temporal →
activities → events → audit consumer.

Off by default (`ORDERFLOW_OTEL_EXPORTER=none`): no tracer provider is installed, and every hook
here checks `tracing_enabled()` and does nothing else, so tracing costs close to nothing. With an
exporter (`otlp`, or `console` for debugging) `configure_tracing` installs a provider, and then:
- the gateway traces each request (FastAPI does so by itself once a provider is installed);
- a published command or event carries its span's context in the W3C `traceparent` header
  (`trace_headers`), and a consumer handles each message in a span that continues it (`consuming`);
- Temporal calls carry it in their headers (`shared.temporal.tracing_interceptors`, on the bridge's
  client and the workers): workflow start, signals, workflow runs, activities.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from aio_pika.abc import AbstractIncomingMessage, HeadersType
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.settings import Settings

SERVICE_NAME_PREFIX = "orderflow-"

_tracer = trace.get_tracer(__name__)


def configure_tracing(settings: Settings, service: str) -> None:
    """Install the tracer provider `settings.otel_exporter` asks for (none: leave tracing off)."""
    if settings.otel_exporter == "none":
        return
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE_NAME_PREFIX + service}))
    # batched: spans are exported from a thread of their own, off the request and message paths
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    trace.set_tracer_provider(provider)


def _exporter(settings: Settings) -> SpanExporter:
    if settings.otel_exporter == "console":
        # one line per span, beside the JSON log lines
        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    # imported only here: a process that does not export over OTLP need not load it
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.otel_endpoint)


def tracing_enabled() -> bool:
    """Whether this process records spans: a tracer provider was installed (by
    `configure_tracing`, or by a test)."""
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

"""Traces: one order's trace runs from the gateway's request over the broker into the bridge, on
through Temporal into the workflow (in the sandbox) and its activities, and over the broker again
to the audit consumer. OpenTelemetry's standard variables configure it; off without an exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from services.audit.consumer import run_audit
from services.bridge.consumer import run_bridge
from services.workers.worker import running_workers
from shared import broker
from shared.contracts import OrderState, Role
from shared.db import Order
from shared.settings import Settings
from shared.tracing import tracing_enabled
from testsupport.amqp import Broker, consumer_queue, own_queues
from testsupport.gateway import bearer, gateway
from testsupport.orders import order_body
from testsupport.polling import eventually
from testsupport.services import running

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process ends while the module runs, kept in memory. A process installs its
    tracer provider once, so the first to need one installs it and later ones add to it."""
    if not tracing_enabled():
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture
def trip_settings(settings: Settings) -> Settings:
    """Queues and task queues of this test's own; the real workflows, in Temporal's sandbox."""
    return own_queues(settings, workflow_sandbox=True, max_running_lifecycles=100_000)


@pytest_asyncio.fixture
async def traced_api(
    trip_settings: Settings,
    broker_channel: Broker,
    temporal_client: Client,
    db_sessions: Sessions,
    spans: InMemorySpanExporter,
) -> AsyncIterator[httpx.AsyncClient]:
    """Gateway, bridge, workers and audit consumer in this process, tracing into `spans`."""
    channel, topology = broker_channel
    async with (
        consumer_queue(broker.declare_placement_queue(channel, topology, trip_settings)),
        consumer_queue(broker.declare_command_queue(channel, topology, trip_settings)),
        consumer_queue(broker.declare_audit_queue(channel, topology, trip_settings)),
        running_workers(temporal_client, trip_settings),
        running(run_bridge, trip_settings),
        running(run_audit, trip_settings),
        gateway(trip_settings, bearer(trip_settings, "trace-customer", Role.CUSTOMER)) as api,
    ):
        yield api


def in_trace(spans: InMemorySpanExporter, trace_id: int) -> dict[str, list[ReadableSpan]]:
    """The spans of one trace so far, by name."""
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans.get_finished_spans():
        if span.context is not None and span.context.trace_id == trace_id:
            found.setdefault(span.name, []).append(span)
    return found


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    identifier: int = span.context.span_id
    return identifier


async def test_one_trace_runs_from_the_request_through_the_broker_temporal_and_back_to_the_audit(
    traced_api: httpx.AsyncClient, trip_settings: Settings, spans: InMemorySpanExporter, db_sessions: Sessions
) -> None:
    placed = await traced_api.post("/orders", json=order_body())
    assert placed.status_code == httpx.codes.ACCEPTED
    order_id = placed.json()["order_id"]
    [request] = [
        span
        for span in spans.get_finished_spans()
        if span.kind is SpanKind.SERVER and span.name == "POST /orders"
    ]
    assert request.context is not None
    trace_id = request.context.trace_id
    placement = f"process {trip_settings.placement_queue}"
    audit = f"process {trip_settings.audit_queue}"

    async def whole_trip() -> dict[str, list[ReadableSpan]] | None:
        found = in_trace(spans, trace_id)
        needed = (
            placement,
            "StartWorkflow:OrderWorkflow",
            "RunWorkflow:OrderWorkflow",
            "RunActivity:publish_events",
            audit,
        )
        if not all(name in found for name in needed):
            return None
        # the audit spans of the bridge's own events may come first: wait for the activity's
        publishing = {span_id(span) for span in found["RunActivity:publish_events"]}
        return found if any(parent_of(span) in publishing for span in found[audit]) else None

    trip = await eventually(whole_trip, what="an audit span of events the workflow's activity published")

    # the broker hop: the bridge's span continues the request's
    [consumed] = trip[placement]
    assert consumed.kind is SpanKind.CONSUMER
    assert consumed.attributes is not None
    assert consumed.attributes["messaging.message.id"] == placed.json()["command_id"]
    assert parent_of(consumed) in {span_id(span) for span in trip_spans(trip)} - {span_id(consumed)}
    # into Temporal: the bridge starts the workflow inside that span
    [start] = trip["StartWorkflow:OrderWorkflow"]
    assert parent_of(start) == span_id(consumed)
    # and out again (awaited above): events published by the workflow's activity reach the audit
    # consumer's span, which continues the activity's
    publishing = {span_id(span) for span in trip["RunActivity:publish_events"]}
    assert {parent_of(span) for span in trip[audit]} & publishing

    await traced_api.post(f"/orders/{order_id}/cancel", json={"reason": "trace seen"})
    await eventually(lambda: _ended(db_sessions, order_id))


def trip_spans(trip: dict[str, list[ReadableSpan]]) -> list[ReadableSpan]:
    return [span for named in trip.values() for span in named]


async def _ended(sessions: Sessions, order_id: str) -> bool:
    async with sessions() as session:
        order = await session.get(Order, order_id, populate_existing=True)
    return order is not None and OrderState(order.state).is_terminal


PROBE = textwrap.dedent(
    """
    import json

    from opentelemetry import trace

    from shared.temporal import tracing_interceptors
    from shared.tracing import configure_tracing, trace_headers, tracing_enabled

    configure_tracing("probe")
    with trace.get_tracer("probe").start_as_current_span("probing"):
        headers = trace_headers()
    seen = {"enabled": tracing_enabled(), "headers": headers, "interceptors": len(tracing_interceptors())}
    print(json.dumps(seen), flush=True)
    if tracing_enabled():
        trace.get_tracer_provider().shutdown()
    """
)


@dataclass
class Probe:
    """What a process that configured tracing from its environment saw, and the spans it printed."""

    enabled: bool
    headers: dict[str, str]
    interceptors: int
    spans: list[dict[str, Any]]


def otel_environment(**variables: str) -> dict[str, str]:
    """This process's environment with no OTEL_* variable but these."""
    return {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")} | variables


def probe(**variables: str) -> Probe:
    """Run `PROBE` in a process of its own (this one has a tracer provider for good)."""
    ran = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=otel_environment(**variables),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    seen, *spans = ran.stdout.splitlines()
    return Probe(**json.loads(seen), spans=[json.loads(span) for span in spans])


def test_without_an_exporter_or_endpoint_nothing_is_traced() -> None:
    assert probe() == Probe(enabled=False, headers={}, interceptors=0, spans=[])


def test_the_console_exporter_prints_a_line_per_span_named_after_the_service() -> None:
    seen = probe(OTEL_TRACES_EXPORTER="console")
    assert seen.enabled and seen.interceptors == 1
    [span] = seen.spans
    assert span["name"] == "probing"
    assert span["resource"]["attributes"]["service.name"] == "orderflow-probe"
    # the header carried the span's own trace and span ids
    _, trace_id, parent_id, _ = seen.headers["traceparent"].split("-")
    assert (f"0x{trace_id}", f"0x{parent_id}") == (span["context"]["trace_id"], span["context"]["span_id"])


def test_the_resource_comes_from_the_standard_variables() -> None:
    [span] = probe(
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="shop-probe",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=staging",
    ).spans
    attributes = span["resource"]["attributes"]
    assert (attributes["service.name"], attributes["deployment.environment"]) == ("shop-probe", "staging")


def test_the_sampler_comes_from_the_standard_variables() -> None:
    seen = probe(OTEL_TRACES_EXPORTER="console", OTEL_TRACES_SAMPLER="always_off")
    assert seen.enabled and seen.spans == []
    flags = int(seen.headers["traceparent"].rsplit("-", 1)[1], 16)
    assert not flags & 0x01  # passed on as not sampled


def test_otel_sdk_disabled_turns_tracing_off() -> None:
    assert not probe(OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true").enabled


def test_an_otlp_endpoint_turns_tracing_on_and_receives_the_spans() -> None:
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

    with HTTPServer(("127.0.0.1", 0), Collector) as collector:
        serving = threading.Thread(target=collector.serve_forever, daemon=True)
        serving.start()
        try:
            seen = probe(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_port}")
        finally:
            collector.shutdown()
    assert seen.enabled
    [(path, body)] = received
    assert path == "/v1/traces"
    [resource_spans] = ExportTraceServiceRequest.FromString(body).resource_spans
    [span] = resource_spans.scope_spans[0].spans
    assert span.name == "probing"


def test_an_unknown_exporter_stops_the_service_with_one_line() -> None:
    ran = subprocess.run(
        [sys.executable, "-c", "from shared.tracing import configure_tracing; configure_tracing('probe')"],
        env=otel_environment(OTEL_TRACES_EXPORTER="otlp,jaeger"),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert ran.returncode == 2
    (line,) = ran.stdout.splitlines()
    assert "invalid settings: OTEL_TRACES_EXPORTER: unknown jaeger" in line

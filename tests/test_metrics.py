"""Metrics: the gateway's /metrics, the consumers' message counters, the lifecycle outcomes and
durations the audit consumer records, Temporal's metrics joined to a service's own, and the
metrics ports `make run` gives several instances."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import aio_pika
import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from temporalio.client import Client

from devstack.stack import check_metrics_ports, free_port, metrics_ports
from services.audit.consumer import run_audit
from shared import broker
from shared.admission_table import AdmissionStatus
from shared.consuming import QueueConsumer
from shared.contracts import EventType, OrderEvent, Role
from shared.db import Admission, AuditEvent, transaction
from shared.metrics import temporal_runtime
from shared.probes import serve_endpoints
from shared.settings import Settings
from testsupport.amqp import Broker, consumer_queue, own_queues
from testsupport.gateway import bearer, gateway
from testsupport.orders import example_event, unique_id
from testsupport.polling import eventually
from testsupport.services import running

Sessions = async_sessionmaker[AsyncSession]
JSON_OBJECT = TypeAdapter(dict[str, Any])


def sample(name: str, **labels: str) -> float:
    """A sample of this process's registry now (0 when it has not been recorded yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def grown(name: str, before: float, **labels: str) -> bool:
    """Whether a sample has grown past `before` (for `eventually` to wait on)."""
    return sample(name, **labels) > before


def scraped(text: str, name: str, **labels: str) -> float | None:
    """A sample of a scrape's answer (None: not in it)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


# --- the gateway ---------------------------------------------------------------------------------
async def test_the_gateway_counts_requests_by_route_template_and_serves_them(
    settings: Settings, db_sessions: Sessions
) -> None:
    order_route = {"method": "GET", "route": "/orders/{order_id}"}
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    before = sample("orderflow_http_requests_total", **order_route, status="404")
    timed_before = sample("orderflow_http_request_duration_seconds_count", **order_route)
    unmatched_before = sample("orderflow_http_requests_total", **unmatched)

    async with gateway(settings, bearer(settings, "olivia", Role.OPERATOR)) as api:
        for _ in range(2):
            assert (await api.get(f"/orders/{unique_id('unknown')}")).status_code == httpx.codes.NOT_FOUND
        assert (await api.get(f"/no-such-path/{unique_id('x')}")).status_code == httpx.codes.NOT_FOUND
        answer = await api.get("/metrics", headers={"Authorization": ""})  # open to scrapers

    assert answer.status_code == httpx.codes.OK
    assert answer.headers["content-type"].startswith("text/plain")
    # every order id lands on its route's template, every unknown path on one series
    assert scraped(answer.text, "orderflow_http_requests_total", **order_route, status="404") == before + 2
    assert (
        scraped(answer.text, "orderflow_http_request_duration_seconds_count", **order_route)
        == timed_before + 2
    )
    assert scraped(answer.text, "orderflow_http_requests_total", **unmatched) == unmatched_before + 1
    assert "/no-such-path" not in answer.text


async def test_the_gateway_reports_the_admission_backlog_as_the_admissions_table_has_it(
    settings: Settings, db_sessions: Sessions
) -> None:
    gauges = {
        "orderflow_admission_placements_waiting": AdmissionStatus.WAITING,
        "orderflow_admission_lifecycles_running": AdmissionStatus.RUNNING,
        "orderflow_admission_lifecycles_in_review": AdmissionStatus.REVIEWING,
        "orderflow_admission_approved_waiting": AdmissionStatus.RESUMING,
    }
    orders = {unique_id(status.value): status for status in gauges.values()}
    async with gateway(settings) as api:
        before = (await api.get("/metrics")).text
        await _insert_admissions(db_sessions, orders)
        try:
            after = (await api.get("/metrics")).text
        finally:
            async with transaction(db_sessions) as session:
                await session.execute(delete(Admission).where(col(Admission.order_id).in_(list(orders))))

    for gauge in gauges:
        was = scraped(before, gauge)
        assert was is not None
        assert scraped(after, gauge) == was + 1, gauge


async def _insert_admissions(sessions: Sessions, statuses: dict[str, AdmissionStatus]) -> None:
    async with transaction(sessions) as session:
        for order_id, status in statuses.items():
            session.add(Admission(order_id=order_id, status=status.value))


# --- the consumers -------------------------------------------------------------------------------
async def test_consumers_count_messages_consumed_requeued_and_dead_lettered_per_queue(
    broker_channel: Broker,
) -> None:
    channel, topology = broker_channel
    name = f"test.metrics.{uuid4().hex[:8]}"
    handled: list[bytes] = []

    async def handle(message: AbstractIncomingMessage, body: dict[str, Any]) -> None:
        if body.get("fail"):
            raise RuntimeError("this message always fails")
        handled.append(message.body)
        await message.ack()

    stop = asyncio.Event()
    async with consumer_queue(
        broker.declare_consumer_queue(channel, topology.commands, broker.ConsumerQueue(name, routing_keys=()))
    ) as queue:
        for body in (b'{"fail": false}', b"not json", b'{"fail": true}'):
            await channel.default_exchange.publish(aio_pika.Message(body=body), routing_key=name)
        consumer = QueueConsumer("test", topology, max_deliveries=2, stop=stop)
        consuming = asyncio.create_task(consumer.run(queue, JSON_OBJECT.validate_json, handle))
        try:
            await eventually(
                lambda: grown(
                    "orderflow_messages_dead_lettered_total", 0, queue=name, reason="processing_failed"
                )
            )
        finally:
            stop.set()
            await consuming

    assert handled == [b'{"fail": false}']
    # the failing message came twice: requeued once, then given up on
    assert sample("orderflow_messages_consumed_total", queue=name) == 4
    assert sample("orderflow_messages_requeued_total", queue=name) == 1
    assert sample("orderflow_messages_dead_lettered_total", queue=name, reason="invalid_json") == 1
    assert sample("orderflow_messages_dead_lettered_total", queue=name, reason="processing_failed") == 1


# --- lifecycle outcomes (the audit consumer) -----------------------------------------------------
@pytest_asyncio.fixture
async def audit(
    base_settings: Settings, broker_channel: Broker, db_sessions: Sessions
) -> AsyncIterator[None]:
    """The audit consumer on a queue of this test's own."""
    channel, topology = broker_channel
    settings = own_queues(base_settings)
    async with (
        consumer_queue(broker.declare_audit_queue(channel, topology, settings)),
        running(run_audit, settings),
    ):
        yield


async def test_the_audit_consumer_counts_each_ending_once_and_times_it_from_admission(
    audit: None,
    broker_channel: Broker,
    db_sessions: Sessions,
) -> None:
    admitted_at = datetime.now(UTC)
    completed_order, cancelled_order = unique_id("completed"), unique_id("cancelled")
    admitted = example_event(completed_order, 2, EventType.ADMITTED, admitted_at)
    completed = example_event(completed_order, 3, EventType.COMPLETED, admitted_at + timedelta(seconds=3.5))
    # cancelled while queued: it ends without ever being admitted
    cancelled = example_event(cancelled_order, 2, EventType.CANCELLED, admitted_at)
    ended = {
        outcome: sample("orderflow_lifecycles_ended_total", outcome=outcome)
        for outcome in ("completed", "cancelled")
    }
    timed = {
        outcome: sample("orderflow_lifecycle_duration_seconds_count", outcome=outcome)
        for outcome in ("completed", "cancelled")
    }
    time_spent = sample("orderflow_lifecycle_duration_seconds_sum", outcome="completed")

    # the terminal event comes twice (at least once delivery): one ending. The consumer takes
    # events in order, so once the last one is counted, the others have been too
    for event in (admitted, completed, completed, cancelled):
        await broker.publish_event(broker_channel[1], event)
    await eventually(lambda: _stored(db_sessions, [admitted, completed, cancelled]))
    await eventually(
        lambda: grown("orderflow_lifecycles_ended_total", ended["cancelled"], outcome="cancelled")
    )

    assert sample("orderflow_lifecycles_ended_total", outcome="completed") == ended["completed"] + 1
    assert sample("orderflow_lifecycles_ended_total", outcome="cancelled") == ended["cancelled"] + 1
    assert sample("orderflow_lifecycle_duration_seconds_count", outcome="completed") == timed["completed"] + 1
    assert sample("orderflow_lifecycle_duration_seconds_sum", outcome="completed") == pytest.approx(
        time_spent + 3.5
    )
    assert sample("orderflow_lifecycle_duration_seconds_count", outcome="cancelled") == timed["cancelled"]


async def _stored(sessions: Sessions, events: list[OrderEvent]) -> bool:
    async with sessions() as session:
        found = await session.scalars(
            select(col(AuditEvent.event_id)).where(col(AuditEvent.event_id).in_([e.event_id for e in events]))
        )
        return len(list(found)) == len(events)


# --- a service's own endpoint, Temporal's metrics included ---------------------------------------
async def test_a_service_serves_its_metrics_and_temporals_on_one_port(settings: Settings) -> None:
    port = free_port()
    runtime = temporal_runtime(port)
    client = await Client.connect(
        settings.temporal_address, namespace=settings.temporal_namespace, runtime=runtime
    )
    await client.count_workflows()
    serve_endpoints("127.0.0.1", port, checks={})

    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")

    assert answer.status_code == httpx.codes.OK
    # Temporal's, in Prometheus' names and units, beside this process's own
    count_requests = scraped(
        answer.text,
        "temporal_request_total",
        namespace=settings.temporal_namespace,
        operation="CountWorkflowExecutions",
        service_name="temporal-core-sdk",
    )
    assert count_requests == 1
    assert "# TYPE temporal_request_latency histogram" in answer.text
    assert scraped(answer.text, "process_cpu_seconds_total") is not None


# --- ports under `make run` ----------------------------------------------------------------------
def test_several_instances_get_metrics_ports_counting_up_from_their_services() -> None:
    settings = Settings(_env_file=None, bridge_instances=3, worker_instances=2)
    assert metrics_ports(settings, "bridge") == [9110, 9111, 9112]
    assert metrics_ports(settings, "workers") == [9120, 9121]
    assert metrics_ports(settings, "audit") == [9130]
    assert metrics_ports(settings, "api") == [0]  # /metrics on its own HTTP port
    assert metrics_ports(settings.model_copy(update={"bridge_metrics_port": 0}), "bridge") == [0, 0, 0]


def test_a_stack_whose_metrics_ports_would_collide_is_refused() -> None:
    crowded = Settings(_env_file=None, bridge_instances=11)  # bridge-11 would take the workers' 9120
    with pytest.raises(ValueError, match="metrics ports overlap"):
        check_metrics_ports(crowded, ("api", "bridge", "workers", "audit"))
    check_metrics_ports(crowded, ("api", "bridge", "audit"))


def test_an_empty_metrics_port_setting_turns_the_endpoint_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERFLOW_AUDIT_METRICS_PORT", "")
    assert Settings(_env_file=None).audit_metrics_port == 0

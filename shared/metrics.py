"""How a process serves its Prometheus metrics, Temporal's among them.

Each process keeps its metrics in prometheus_client's default registry (with the process's own
CPU, memory and file descriptors). The gateway answers `/metrics` on its HTTP port; the bridge,
workers and audit consumer serve the registry on a port of their own (`serve_metrics`).

The Temporal SDK's metrics (`temporal_*`: polls, task latencies, slots, client requests) are kept
by its Rust core, which serves them on a loopback port of its own; `temporal_runtime` sets that up
and adds them to this process's answer at each scrape, so one port shows everything and the
Python side does no work per metric update.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterable

import structlog
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from temporalio.runtime import LoggingConfig, PrometheusConfig, Runtime, TelemetryConfig

CORE_SCRAPE_TIMEOUT_SECONDS = 2.0

log = structlog.get_logger(__name__)


def serve_metrics(host: str, port: int) -> None:
    """Serve this process's metrics at http://host:port/metrics from a thread (port 0: not at all).
    A port already taken costs the metrics, not the service: it logs the error and runs on."""
    if not port:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as error:
        log.error("metrics not served", host=host, port=port, error=str(error))
        return
    log.info("serving metrics", url=f"http://{host}:{port}/metrics")


class CoreMetrics(Collector):
    """The Temporal core's metrics, read from its endpoint whenever this registry is scraped."""

    def __init__(self, url: str) -> None:
        self._url = url

    def collect(self) -> Iterable[Metric]:
        try:
            with urllib.request.urlopen(self._url, timeout=CORE_SCRAPE_TIMEOUT_SECONDS) as answer:
                text = answer.read().decode()
        except OSError as error:
            log.warning("temporal metrics unavailable", url=self._url, error=str(error))
            return []
        return text_string_to_metric_families(text)


def temporal_runtime(metrics_port: int, logging: LoggingConfig | None = LoggingConfig.default) -> Runtime:
    """A Temporal runtime (for `Runtime.set_default`) whose metrics join this process's registry,
    if the process serves metrics at all (`metrics_port`, 0: it does not)."""
    if not metrics_port:
        return Runtime(telemetry=TelemetryConfig(logging=logging))
    core_port = _free_loopback_port()
    REGISTRY.register(CoreMetrics(f"http://127.0.0.1:{core_port}/metrics"))
    core_metrics = PrometheusConfig(
        bind_address=f"127.0.0.1:{core_port}",
        # the names and units Prometheus expects: counters end in _total, durations in seconds
        counters_total_suffix=True,
        durations_as_seconds=True,
    )
    return Runtime(telemetry=TelemetryConfig(logging=logging, metrics=core_metrics))


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

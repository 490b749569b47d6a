"""Temporal's metrics in this process's Prometheus registry: the SDK's Rust core serves them on a loopback
port, and each scrape of ours adds them (no Python work per metric update)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterable

import structlog
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from temporalio.runtime import LoggingConfig, PrometheusConfig, Runtime, TelemetryConfig

CORE_SCRAPE_TIMEOUT_SECONDS = 2.0

log = structlog.get_logger(__name__)


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
    """A Temporal runtime whose metrics join this process's, if it serves any (`metrics_port` not 0)."""
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

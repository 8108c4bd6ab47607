"""One set of OpenTelemetry instruments, read two ways: ``GET /metrics`` and OTLP.

Instruments are OpenTelemetry's; a ``PrometheusMetricReader`` (from
``opentelemetry-exporter-prometheus``) presents them to a ``prometheus_client``
registry of this process's own, which renders the Prometheus text format. With an
OTLP endpoint configured, a periodic reader sends the very same instruments over OTLP.

Why this way round: OpenTelemetry has a reader interface that lets one set of
instruments feed several exporters, and the Prometheus reader maps its names and
units to Prometheus conventions (``agent.turn.duration`` in seconds becomes
``agent_turn_duration_seconds``). The other way round (``prometheus_client``
instruments) has no maintained bridge to OTLP, so every number would be kept twice.
"""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hosting.telemetry.settings import TelemetrySettings

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Turn latencies run from tens of milliseconds (a warm CLI, the local model) to minutes
(a research turn with many searches); OpenTelemetry's default buckets are for milliseconds."""


class MetricsExport:
    """The process's meter provider and its readers."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        if settings.export_metrics:
            # Imported only when exporting: no exporter module, no export thread otherwise.
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        self._provider = MeterProvider(metric_readers=readers,
                                       resource=Resource.create({"service.name": settings.service_name}))

    def meter(self, name: str) -> Meter:
        return self._provider.get_meter(name)

    def render(self) -> bytes:
        """The Prometheus text exposition of every instrument, as of now."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Flush the OTLP reader (a last export) and stop its thread."""
        self._provider.shutdown()



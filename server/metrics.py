"""Prometheus metrics of one app, in a registry of its own.

A registry per app (rather than the process-global default) lets several apps live in one
process, as the tests make them, without duplicate-metric errors. Labels are bounded: the
endpoint is the route template (``/v1/models/{name}/infer``), never the raw path, so a
scanner cannot grow the series without end.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Evaluation takes from tens of milliseconds (plain, small rings) to minutes (deep CNNs).
EVAL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Request counts, evaluation durations, queue depth and key-store size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "he_inference_requests_total",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.request_bytes = Counter(
            "he_inference_request_bytes_total",
            "Bytes received in request bodies",
            ["endpoint"],
            registry=self.registry,
        )
        self.response_bytes = Counter(
            "he_inference_response_bytes_total",
            "Bytes sent in response bodies",
            ["endpoint"],
            registry=self.registry,
        )
        self.eval_seconds = Histogram(
            "he_inference_eval_seconds",
            "Circuit evaluation time per query",
            ["model"],
            buckets=EVAL_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "he_inference_queue_depth",
            "Evaluations waiting for a worker",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "he_inference_evaluations_in_flight",
            "Evaluations running now",
            registry=self.registry,
        )
        self.key_store_bytes = Gauge(
            "he_inference_key_store_bytes",
            "Bytes of evaluation keys on disk",
            registry=self.registry,
        )
        self.loaded_contexts = Gauge(
            "he_inference_loaded_contexts",
            "Backend contexts with keys loaded in memory",
            registry=self.registry,
        )

    def watch(self, key_store_bytes: Callable[[], float], loaded: Callable[[], float]) -> None:
        """Read the key-store size and loaded-context count at each scrape."""
        self.key_store_bytes.set_function(key_store_bytes)
        self.loaded_contexts.set_function(loaded)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)

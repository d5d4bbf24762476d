"""The service's Prometheus metrics (docs/serving.md says how to read them)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


class Metrics:
    """Prometheus metrics of one app (a registry of its own, so several apps can live in one process)."""

    def __init__(self, num_layers: int, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("romebert_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)  # fmt: skip
        self.errors = Counter("romebert_errors", "requests answered with an error, by status", ["status"],
                              registry=self.registry)  # fmt: skip
        self.shed = Counter("romebert_shed", "POST /predict refused: at admission, before the body is read "
                            "(admission, too large), or by the full queue after parsing (queue)", ["stage"],
                            registry=self.registry)  # fmt: skip
        self.latency = Histogram("romebert_request_latency_seconds", "time from request to answer (POST /predict)",
                                 buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5),
                                 registry=self.registry)  # fmt: skip
        self.exit_layer = Histogram("romebert_exit_layer", "the layer each input exited at",
                                    buckets=tuple(range(1, num_layers + 1)), registry=self.registry)  # fmt: skip
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch = Histogram("romebert_batch_rows", "rows of each layer call", buckets=tuple(s for s in sizes
                               if s <= max_batch), registry=self.registry)  # fmt: skip
        self.depth = Gauge("romebert_queue_depth", "inputs in flight (queued or running)", registry=self.registry)
        self.pending = Gauge("romebert_pending_requests", "requests admitted and not yet answered",
                             registry=self.registry)  # fmt: skip
        self.pending_bytes = Gauge("romebert_pending_bytes", "bytes of admitted bodies not yet tokenized",
                                   registry=self.registry)  # fmt: skip

    def observe(self, event: str, value: float) -> None:
        if event == "exit":
            self.exit_layer.observe(value)
        elif event == "batch":
            self.batch.observe(value)
        elif event == "depth":
            self.depth.set(value)

    def watch_guard(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the accuracy guard's state, read at each scrape."""
        self.registry.register(_GuardCollector(snapshot))


class _GuardCollector:
    """The guard's gauges and counters from its snapshot (``AccuracyGuard.snapshot``)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list:
        return []  # registered without a sample collection at registration time

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot()
        gauges = [
            ("disagreement", "share of the guard's window whose exit under the thresholds in force answers "
             "otherwise than the final exit", s["estimate"]),
            ("disagreement_upper", "the upper confidence bound of that share (kept within the target)", s["upper"]),
            ("disagreement_lower", "its lower confidence bound (above the target: the guard tightens)", s["lower"]),
            ("max_disagreement", "the target (--max-disagreement)", s["max_disagreement"]),
            ("layer_speedup", "layers / mean exit layer of the window under the thresholds in force", s["speedup"]),
            ("window", "watched inputs in the guard's window", s["window"]),
        ]  # fmt: skip
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"romebert_guard_{name}", text, value=_number(value))
        per_exit = [("threshold", "the threshold in force at each exit", s["thresholds"]),
                    ("exit_disagreement", "share of the window leaving at each exit whose answer differs from the "
                     "final exit's", s["exit_disagreement"])]  # fmt: skip
        for name, text, values in per_exit:
            family = GaugeMetricFamily(f"romebert_guard_{name}", text, labels=["exit"])
            for k, v in enumerate(values, start=1):
                family.add_metric([str(k)], _number(v))
            yield family
        counters = [
            ("watched", "inputs watched (a share --guard-rate of the default policy's)", s["watched"]),
            ("rerun_rows", "watched inputs that left early and were run again to the final exit", s["rerun_rows"]),
            ("rerun_layers", "layer work of those re-runs (rows x layers): the guard's extra work", s["rerun_layers"]),
            ("dropped", "watched early exits not re-run because the re-run backlog was full", s["dropped"]),
            ("checked", "answers served early to watched inputs and checked against the final exit", s["checked"]),
            ("disagreed", "of those, answers that differed from the final exit's", s["disagreed"]),
            ("updates", "threshold changes", s["updates"]),
        ]  # fmt: skip
        for name, text, value in counters:
            yield CounterMetricFamily(f"romebert_guard_{name}", text, value=value)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)

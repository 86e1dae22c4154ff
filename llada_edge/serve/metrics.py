"""The server's Prometheus metrics, on a registry of its own (several apps in one process do not share counts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds, from a tiny model's tens of milliseconds to a real-size image's minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llada_edge_requests", "Requests answered, by task and outcome "
                                "(ok, bad_request, busy, timeout, cancelled, unavailable, error)",
                                ["task", "outcome"], registry=self.registry)
        self.latency = Histogram("llada_edge_request_seconds", "Request latency (queueing included), by task",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("llada_edge_queue_wait_seconds", "Time a request waited for a worker",
                                    ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("llada_edge_stage_seconds", "Time per pipeline stage (tokenizer, backbone, "
                                "thinking, decoder...), by task", ["task", "stage"], buckets=LATENCY_BUCKETS,
                                registry=self.registry)
        self.forward_passes = Counter("llada_edge_forward_passes", "Backbone forward passes, by task", ["task"],
                                      registry=self.registry)
        self.generated_tokens = Counter("llada_edge_generated_tokens", "Tokens generated (text or image), by task",
                                        ["task"], registry=self.registry)
        depth = Gauge("llada_edge_queue_depth", "Requests waiting for a worker", registry=self.registry)
        depth.set_function(queue_depth)
        busy = Gauge("llada_edge_requests_running", "Requests running on a worker", registry=self.registry)
        busy.set_function(running)

    def answered(self, task: str, outcome: str, seconds: float) -> None:
        self.requests.labels(task, outcome).inc()
        self.latency.labels(task).observe(seconds)

    def ran(self, task: str, result: Any, waited: float) -> None:
        """The figures a finished pipeline result carries (TextResult or ImageResult)."""
        self.queue_wait.labels(task).observe(waited)
        for stage, seconds in result.timings.items():
            if stage != "total":
                self.stages.labels(task, stage).observe(seconds)
        self.forward_passes.labels(task).inc(result.forward_passes)
        tokens = getattr(result, "tokens", None)
        if tokens is None:
            tokens = result.vq_tokens
        self.generated_tokens.labels(task).inc(len(tokens))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

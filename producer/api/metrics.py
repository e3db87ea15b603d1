"""Prometheus metrics of one API process (its own registry, so several apps can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ApiMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.submitted = Counter("openlora_jobs_submitted", "Jobs this API enqueued", ["endpoint"], registry=r)
        self.refused = Counter("openlora_requests_refused", "Requests refused before enqueueing", ["status"],
                               registry=r)
        self.tokens = Counter("openlora_tokens_generated", "Completion tokens this API returned or streamed",
                              registry=r)
        self.ttft = Histogram("openlora_ttft_seconds", "Submit to first token, on streams this API serves",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("openlora_inter_token_seconds", "Time between tokens on streams this API serves",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("openlora_queue_depth", "Entries in each shard's job stream (queued + running)",
                                 ["shard"], registry=r)
        self.workers = Gauge("openlora_workers_alive", "Workers with a live heartbeat", registry=r)
        self.adapter_cache = Gauge("openlora_adapter_cache", "Each live worker's adapter-cache counters since it "
                                   "started: admissions (requests that took a GPU slot), gpu_loads, host_hits, "
                                   "host_misses (reads from disk), host_loads", ["worker", "counter"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of ``kvpool serve`` (``GET /metrics``), named as vLLM names them.

Counters and the time-to-first-token histogram are updated by the engine-loop thread as
requests progress; gauges (pool usage, queue depth, running requests, tiers) are set from a
snapshot taken on the loop thread at scrape time. Each server has its own registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class ServerMetrics:
    """The metric families; one instance per server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "kvpool:time_to_first_token_seconds",
            "Time from receiving a request to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvpool:e2e_request_latency_seconds",
            "Time from receiving a request to its last token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prefix_queries = Counter(
            "kvpool:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (every prompt token).",
            registry=r,
        )
        self.prefix_hits = Counter(
            "kvpool:prefix_cache_hits",
            "Prompt tokens found in the cache (not prefilled).",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvpool:prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "kvpool:generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.requests = Counter(
            "kvpool:request_success",
            "Finished requests by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.refused = Counter(
            "kvpool:request_refused", "Requests refused by HTTP status.", ["status"], registry=r
        )
        self.cancelled = Counter(
            "kvpool:request_cancelled",
            "Requests cancelled (client disconnect, shutdown).",
            registry=r,
        )
        self.running = Gauge("kvpool:num_requests_running", "Requests in the engine.", registry=r)
        self.waiting = Gauge(
            "kvpool:num_requests_waiting",
            "Requests queued for pool blocks (the queue --max-queue bounds).",
            registry=r,
        )
        self.kv_usage = Gauge(
            "kvpool:kv_cache_usage_perc", "Fraction of pool blocks in use (0..1).", registry=r
        )
        self.pool_blocks = Gauge(
            "kvpool:pool_blocks", "Pool blocks by state.", ["state"], registry=r
        )
        self.sessions = Gauge(
            "kvpool:sessions",
            "Agents' caches by tier (hot: pool, cold: disk).",
            ["tier"],
            registry=r,
        )
        self.tier_errors = Gauge(
            "kvpool:cache_tier_errors",
            "Cold-tier operations that failed (Redis unreachable); requests were served anyway "
            "(a counter; set from the store).",
            registry=r,
        )
        self.tier = Gauge(
            "kvpool:cache_tier",
            "The cold tier's counters (blocks written, deduplicated, corrupt, bytes sent, ...) "
            "and available (1, or 0 while backing off after an error).",
            ["stat"],
            registry=r,
        )
        self.save_errors = Gauge(
            "kvpool:cache_save_errors",
            "Session caches that could not be written (a full or read-only disk, a bad path), "
            "each on its own (a counter; set from the store).",
            registry=r,
        )
        self.dropped = Gauge(
            "kvpool:cache_dropped",
            "Session caches lost: evicted while they could not be written, or deleted for the "
            "disk budget (a counter; set from the store).",
            registry=r,
        )
        self.evictions = Gauge(
            "kvpool:cache_evictions",
            "Caches moved from the pool to disk since start (a counter; set from the store).",
            registry=r,
        )

    def set_snapshot(self, snap: dict[str, Any]) -> None:
        """Set the gauges from :meth:`EngineLoop.snapshot`'s dict."""
        pool = snap["pool"]
        self.running.set(snap["requests"]["running"])
        self.waiting.set(snap["requests"]["waiting"])
        self.kv_usage.set(pool["num_used"] / pool["num_blocks"] if pool["num_blocks"] else 0.0)
        self.pool_blocks.labels("used").set(pool["num_used"])
        self.pool_blocks.labels("free").set(pool["num_free"])
        self.pool_blocks.labels("cached").set(pool["num_cached"])
        self.pool_blocks.labels("shared").set(pool["num_shared"])
        store = snap["store"]
        self.sessions.labels("hot").set(store["num_hot"])
        self.sessions.labels("cold").set(store["num_cold"])
        self.evictions.set(store["num_evictions"])
        self.tier_errors.set(store["num_tier_errors"])
        self.save_errors.set(store["num_save_errors"])
        self.dropped.set(store["num_dropped"])
        for name, value in store["tier"].items():
            if isinstance(value, bool | int | float):
                self.tier.labels(name).set(float(value))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The router's Prometheus metrics (`baton_router_` prefix), on its own registry."""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from baton.protos.errors import ErrorCode

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    """Request outcomes, latencies, retries, migrations, breakers, worker health, policy decisions."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("baton_router_requests", "Requests by API and final status", ["api", "status"],
                                registry=r)
        self.ttft = Histogram("baton_router_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("baton_router_inter_token_latency_seconds", "Gap between streamed chunks", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("baton_router_e2e_latency_seconds", "Whole request latency", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.retries = Counter("baton_router_retries", "Attempts retried on another worker before the first token",
                               ["reason"], registry=r)
        """Reasons are error codes in lower case (prefill_failed, internal, ...)."""
        self.migrations = Counter("baton_router_migrations", "Streams moved to another decode worker mid-way",
                                  registry=r)
        self.breaker_open = Gauge("baton_router_breaker_open", "1 when the worker's circuit breaker is not closed",
                                  ["worker"], registry=r)
        self.worker_healthy = Gauge("baton_router_worker_healthy", "1 when the worker passed its last health check",
                                    ["worker", "role"], registry=r)
        self.decisions = Counter("baton_router_policy_decisions", "Workers chosen, by role and policy",
                                 ["role", "policy", "worker"], registry=r)
        self.paths = Counter("baton_router_paths", "Requests by path (disaggregated or decode_only)", ["path"],
                             registry=r)
        self.in_flight = Gauge("baton_router_in_flight_requests", "Requests being served", registry=r)
        self.queued = Gauge("baton_router_queued_requests", "Requests waiting in the router for a worker with room",
                            registry=r)
        self.live_replicas = Gauge("baton_router_live_replicas", "Router replicas counted live, this one included "
                                   "(the router queue limit is split among them)", registry=r)
        self.live_replicas.set(1)
        self.backpressure = Counter("baton_router_backpressure", "Times a request waited because workers were full",
                                    ["role", "reason"], registry=r)
        self.failures = Counter("baton_router_failures", "Requests that ended with an error, by error code",
                                ["reason"], registry=r)
        self.stream_failures = Counter("baton_router_stream_failures", "Streams that failed after their first "
                                       "chunk (HTTP: after the 200 header), by API and reason (error code or "
                                       "client_closed)", ["api", "reason"], registry=r)
        self._export_zeros()

    def forget_worker(self, address: str, role) -> None:
        """Drop a removed worker's health and breaker gauges (a stale 0 would look like an outage)."""
        for gauge, labels in ((self.worker_healthy, (address, role.value)), (self.breaker_open, (address,))):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def _export_zeros(self) -> None:
        """Create every known label set at 0, so a dashboard or an alert over `rate(...)` sees a
        series (0) before the first failure instead of no data."""
        codes = [name.lower() for name in ErrorCode.keys() if name != "ERROR_CODE_UNSPECIFIED"]
        for code in codes:
            self.failures.labels(reason=code)
            self.retries.labels(reason=code)
        for role in ("prefill", "decode"):
            for reason in BACKPRESSURE_REASONS:
                self.backpressure.labels(role=role, reason=reason)


def labelled(metric, *labels: str):
    """`metric.labels(*labels)` (positional, in the metric's label order), cached on the metric:
    the per-request paths pay a dict look-up, not prometheus_client's lock and checks. Children
    of removed workers stay cached as long as the metric keeps them."""
    cache = metric.__dict__.get("_baton_children")
    if cache is None:
        cache = metric._baton_children = {}
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child


BACKPRESSURE_REASONS = ("full", "overloaded")
"""Why a request waited: every worker of the role was at its capacity (full), or one refused it (overloaded)."""


class WorkerCountersCollector:
    """Re-exports each worker's cumulative counters from its latest load report, so one scrape of
    the gateway shows prefix-cache hits and KV transfer bytes of the whole cluster."""

    FIELDS = (("prefix_tokens_matched", "baton_router_worker_prefix_tokens_matched", "Prompt tokens found in the prefix cache"),
              ("prefix_tokens_looked_up", "baton_router_worker_prefix_tokens_looked_up", "Prompt tokens looked up in the prefix cache"),
              ("kv_bytes_received", "baton_router_worker_kv_bytes_received", "KV bytes the worker received"),
              ("kv_bytes_sent", "baton_router_worker_kv_bytes_sent", "KV bytes the worker sent"),
              ("kv_transfer_failures", "baton_router_worker_kv_transfer_failures", "KV transfers that failed"))

    def __init__(self, entries: Callable[[], Iterable]) -> None:
        self.entries = entries

    def collect(self):
        families = {field: CounterMetricFamily(name, doc, labels=["worker", "role"]) for field, name, doc in self.FIELDS}
        for entry in self.entries():
            for field, family in families.items():
                family.add_metric([entry.address, entry.role.value], float(getattr(entry.load, field)))
        yield from families.values()

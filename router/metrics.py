"""The router's Prometheus metrics (`baton_router_` prefix), on its own registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

"""Server-side figures for a run, from Prometheus text scraped before and after it.

When the server is Baton (its /metrics has `baton_` samples) the difference of the two
scrapes gives the router's view of the run: requests by status, retries by reason,
mid-stream migrations, paths (disaggregated / decode_only), and the router's own mean TTFT
and E2E. The workers' own metrics live on their own ports, but the router re-exports every worker's cumulative counters from its load reports
(`baton_router_worker_prefix_tokens_matched/looked_up`, `..._kv_bytes_received`,
`..._kv_transfer_failures`, refreshed at scrape time); the run's prefix-cache hit rate and KV
bytes are their differences, summed over workers. When absent (an older router) the report
names them under `unavailable` instead of inventing numbers. The gateway's
/workers page still carries each worker's lifetime prefix-hit rate (from its load reports),
reported as `workers_prefix_hit_rate`; the client-side hit rate for the run comes from
usage.cached_tokens (see metrics.summarize).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]

MATCHED = "baton_router_worker_prefix_tokens_matched_total"
LOOKED_UP = "baton_router_worker_prefix_tokens_looked_up_total"
RECEIVED = "baton_router_worker_kv_bytes_received_total"
FAILURES = "baton_router_worker_kv_transfer_failures_total"


def parse(text: Optional[str]) -> Optional[Snapshot]:
    """Samples of a Prometheus text page by (name, sorted labels); None when there is no page."""
    if text is None:
        return None
    samples: Snapshot = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.endswith("_created"):
                    samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except ValueError:
        return None
    return samples


def is_baton(snapshot: Optional[Snapshot]) -> bool:
    return bool(snapshot) and any(name.startswith("baton_") for name, _ in snapshot)


def _sum(snapshot: Snapshot, name: str, by: Optional[str] = None) -> Any:
    """Sum of a sample's values, or a dict of sums by one label."""
    if by is None:
        return sum(v for (n, _), v in snapshot.items() if n == name)
    out: dict[str, float] = {}
    for (n, labels), v in snapshot.items():
        if n == name:
            key = dict(labels).get(by, "")
            out[key] = out.get(key, 0.0) + v
    return out


def _has(snapshot: Snapshot, name: str) -> bool:
    return any(n == name for n, _ in snapshot)


def delta(before: Snapshot, after: Snapshot) -> Snapshot:
    """after - before for every sample in `after` (meaningful for counters and histogram sums / counts)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _by(snapshot: Snapshot, name: str, label: str) -> dict[str, float]:
    return {k: v for k, v in sorted(_sum(snapshot, name, label).items()) if v}


def _mean_ms(d: Snapshot, name: str) -> Optional[float]:
    count = _sum(d, name + "_count")
    return 1000.0 * _sum(d, name + "_sum") / count if count else None


def baton_report(before: Optional[Snapshot], after: Optional[Snapshot], workers_json: Optional[str] = None,
                 source: str = "") -> dict:
    """The server-side section of a run's report (see the module doc)."""
    if after is None:
        return {"available": False, "is_baton": False, "source": source,
                "note": "no Prometheus page at the server's /metrics"}
    if not is_baton(after):
        return {"available": True, "is_baton": False, "source": source,
                "note": "the server's /metrics has no baton_ samples; server-side figures skipped"}
    d = delta(before or {}, after)
    retries = _by(d, "baton_router_retries_total", "reason")
    report: dict[str, Any] = {
        "available": True, "is_baton": True, "source": source,
        "router": {
            "requests_by_status": _by(d, "baton_router_requests_total", "status"),
            "retries": sum(retries.values()), "retries_by_reason": retries,
            "migrations": _sum(d, "baton_router_migrations_total"),
            "paths": _by(d, "baton_router_paths_total", "path"),
            "ttft_mean_ms": _mean_ms(d, "baton_router_time_to_first_token_seconds"),
            "e2e_mean_ms": _mean_ms(d, "baton_router_e2e_latency_seconds"),
        },
        "prefix_cache_hit_rate": None, "kv_transfer_bytes": None, "kv_transfer_failures": None,
        "unavailable": [],
    }
    if _has(after, LOOKED_UP):
        looked_up = _sum(d, LOOKED_UP)
        report["prefix_cache_hit_rate"] = _sum(d, MATCHED) / looked_up if looked_up else 0.0
        report["kv_transfer_bytes"] = _sum(d, RECEIVED)
        report["kv_transfer_failures"] = _sum(d, FAILURES)
    else:
        report["unavailable"] += [f"{n} (the router re-exports workers' counters since Baton 0.1)"
                                  for n in (MATCHED, RECEIVED, FAILURES)]
    report["workers_prefix_hit_rate"] = _workers_hit_rates(workers_json)
    return report


def _workers_hit_rates(workers_json: Optional[str]) -> Optional[dict[str, float]]:
    """Each worker's lifetime prefix-hit rate from the gateway's /workers page, if it has one."""
    if not workers_json:
        return None
    try:
        rows = json.loads(workers_json)
        return {f"{r['role']}@{r['address']}": float(r["load"]["prefix_hit_rate"]) for r in rows
                if r.get("load")}  # a down worker has no current load
    except (ValueError, KeyError, TypeError):
        return None

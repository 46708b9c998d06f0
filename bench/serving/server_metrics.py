"""Server-side figures for a run, from Prometheus text scraped before and after it.

When the server is Baton (its /metrics has `baton_` samples) the difference of the two
scrapes gives the router's view of the run: requests by status, retries by reason,
mid-stream migrations, paths (disaggregated / decode_only), and the router's own mean TTFT
and E2E. The gateway's /metrics is the router's registry only; the worker metrics
(`baton_worker_prefix_cache_hit_ratio`, `baton_kv_transfer_bytes_total`,
`baton_kv_transfer_failures_total`) live on each worker's own port, so when they are absent
the report names them under `unavailable` instead of inventing numbers. The gateway's
/workers page still carries each worker's lifetime prefix-hit rate (from its load reports),
reported as `workers_prefix_hit_rate`; the client-side hit rate for the run comes from
usage.cached_tokens (see metrics.summarize).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]

WORKER_ONLY = {
    "prefix_cache_hit_rate": "baton_worker_prefix_cache_hit_ratio",
    "kv_transfer_bytes": "baton_kv_transfer_bytes_total",
    "kv_transfer_failures": "baton_kv_transfer_failures_total",
}


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
    for key, name in WORKER_ONLY.items():
        if not _has(after, name):
            report["unavailable"].append(f"{name} (a worker metric; not exported at the gateway's /metrics)")
        elif key == "prefix_cache_hit_rate":
            values = [v for (n, _), v in after.items() if n == name]
            report[key] = sum(values) / len(values)
        else:
            report[key] = _sum(d, name)
    report["workers_prefix_hit_rate"] = _workers_hit_rates(workers_json)
    return report


def _workers_hit_rates(workers_json: Optional[str]) -> Optional[dict[str, float]]:
    """Each worker's lifetime prefix-hit rate from the gateway's /workers page, if it has one."""
    if not workers_json:
        return None
    try:
        rows = json.loads(workers_json)
        return {f"{r['role']}@{r['address']}": float(r["load"]["prefix_hit_rate"]) for r in rows}
    except (ValueError, KeyError, TypeError):
        return None

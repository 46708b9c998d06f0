"""Baton's alert rules under Prometheus's own rule engine (`promtool test rules`, from Debian's
`prometheus` package): each alert fires on synthetic series that show its condition, with the
labels an operator's routing needs, and stays silent on the same series when healthy."""
import subprocess

import pytest
import yaml

from tests.helpers import prometheus as prom

R = {"job": "baton", "instance": "10.0.0.1:8000"}
"""Target labels of a router."""
W = {"job": "baton", "instance": "10.0.0.2:9000"}
"""Target labels of a worker."""


def series(name: str, labels: dict, values: str) -> dict:
    text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def ttft(values_fast: str, values_slow: str) -> list[dict]:
    """TTFT histogram buckets: `values_fast` requests under 0.5 s, `values_slow` over 5 s."""
    return [series("baton_router_time_to_first_token_seconds_bucket", {**R, "le": "0.5"}, values_fast),
            series("baton_router_time_to_first_token_seconds_bucket", {**R, "le": "5"}, values_fast),
            series("baton_router_time_to_first_token_seconds_bucket", {**R, "le": "+Inf"}, values_slow)]


HEALTHY = [
    series("up", R, "1x20"),
    series("baton_router_in_flight_requests", R, "0x20"),
    series("baton_router_worker_healthy", {**R, "worker": "10.0.0.3:50051", "role": "decode"}, "1x20"),
    series("baton_router_breaker_open", {**R, "worker": "10.0.0.3:50051"}, "0x20"),
    series("baton_worker_kv_usage", {**W, "role": "decode"}, "0.5x20"),
    series("baton_kv_transfer_failures_total", {**W, "role": "decode", "backend": "nixl"}, "0x20"),
    series("baton_router_requests_total", {**R, "api": "chat", "status": "200"}, "0+60x20"),
    series("baton_router_failures_total", {**R, "reason": "no_worker"}, "0x20"),
    *ttft("0+60x20", "0+60x20"),
]
BROKEN = {
    "BatonNoHealthyDecodeWorker": [series("baton_router_worker_healthy",
                                          {**R, "worker": "10.0.0.3:50051", "role": "decode"}, "0x20")],
    "BatonTTFTOverSLO": ttft("0x20", "0+60x20"),
    "BatonKVCacheNearlyFull": [series("baton_worker_kv_usage", {**W, "role": "decode"}, "0.97x20")],
    "BatonKVTransferFailures": [series("baton_kv_transfer_failures_total",
                                       {**W, "role": "decode", "backend": "nixl"}, "0+3x20")],
    "BatonBreakerOpen": [series("baton_router_breaker_open", {**R, "worker": "10.0.0.3:50051"}, "1x20")],
    "BatonRequestErrors": [series("baton_router_failures_total", {**R, "reason": "no_worker"}, "0+30x20")],
    "BatonTargetDown": [series("up", R, "0x20")],
}
"""Per alert: the series replacing their healthy namesakes (same name and labels)."""


def _with(replacements: list[dict]) -> list[dict]:
    replaced = {s["series"] for s in replacements}
    return [s for s in HEALTHY if s["series"] not in replaced] + replacements


def _run_promtool(tmp_path, tests: list[dict]):
    if not prom.binary("promtool"):
        pytest.skip(prom.MISSING)
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(prom.PROMETHEUS_DIR / "baton-rules.yml")],
                                    "evaluation_interval": "1m", "tests": tests}))
    return subprocess.run([prom.binary("promtool"), "test", "rules", str(path)], capture_output=True, text=True)


def test_every_alert_has_a_broken_case():
    assert {r["alert"] for r in prom.alert_rules()} == set(BROKEN)
    assert all(r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["summary"]
               for r in prom.alert_rules())


def test_each_alert_fires_on_its_condition_and_not_when_healthy(tmp_path):
    rules = {r["alert"]: r for r in prom.alert_rules()}
    tests = []
    for name, broken in BROKEN.items():
        checks = [{"eval_time": "15m", "alertname": other, "exp_alerts": []} for other in rules if other != name]
        tests.append({"interval": "1m", "input_series": _with(broken), "alert_rule_test": checks})
        tests.append({"interval": "1m", "input_series": _with(broken),
                      "promql_expr_test": [{"expr": f'ALERTS{{alertname="{name}", alertstate="firing"}}',
                                            "eval_time": "15m", "exp_samples": [{"labels": _alert_labels(name, rules[name]),
                                                                                 "value": 1}]}]})
    tests.append({"interval": "1m", "input_series": HEALTHY,
                  "alert_rule_test": [{"eval_time": "15m", "alertname": n, "exp_alerts": []} for n in rules]})
    result = _run_promtool(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_labels(name: str, rule: dict) -> str:
    """The labels of the rule's firing ALERTS series: alertname, state, the rule's labels and the
    labels its expression keeps (routing needs them: which router, worker or backend)."""
    kept = {"BatonNoHealthyDecodeWorker": R, "BatonTTFTOverSLO": {"job": "baton"},
            "BatonKVCacheNearlyFull": {**W, "role": "decode"}, "BatonKVTransferFailures": {"job": "baton", "backend": "nixl"},
            "BatonBreakerOpen": {"job": "baton", "worker": "10.0.0.3:50051"}, "BatonRequestErrors": {"job": "baton"},
            "BatonTargetDown": R}[name]
    labels = {"__name__": "ALERTS", "alertname": name, "alertstate": "firing", **rule["labels"], **kept}
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"

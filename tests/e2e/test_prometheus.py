"""Prometheus against a real `baton up`: the shipped scrape config (deploy/prometheus/prometheus.yml,
with the targets file `baton up --prometheus-targets` writes) scrapes the router and both
workers while the test sends load; then every PromQL expression of the Grafana dashboard and of
the alert rules is evaluated through Prometheus's HTTP API. Each must parse and return data
(a finite value for the dashboard, the SIGNAL of `SIGNAL OP THRESHOLD` for an alert), every
series name they read must exist, Prometheus must evaluate every rule without error, and on
this healthy cluster the alerts that depend on no timing must stay inactive. Every `baton_`
metric Prometheus sees is documented in docs/metrics.md."""
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.helpers import prometheus as prom
from tests.helpers.workers import REPO

pytestmark = pytest.mark.slow
RATE_WINDOW = "1m"
"""What `$__rate_interval` becomes: the load below falls inside it."""
QUIET_ALERTS = {"BatonNoHealthyDecodeWorker", "BatonKVCacheNearlyFull", "BatonKVTransferFailures",
                "BatonBreakerOpen", "BatonTargetDown"}
"""Alerts that must not be pending or firing on a healthy cluster under light load."""


@pytest.fixture(scope="module")
def prometheus(baton_up, baton_up_targets, tmp_path_factory):
    if not prom.binary():
        pytest.skip(prom.MISSING)
    server = prom.Prometheus(tmp_path_factory.mktemp("prometheus"), baton_up_targets)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _send_load(gateway: str) -> int:
    """Bounded load: streamed and whole chats, long prompts (prefill + KV transfer) sharing a prefix
    (prefix-cache hits) and short ones (decode-only), plus one bad request. Returns requests sent."""
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    shared = "You are a helpful assistant who answers questions about geography in one short sentence. "
    prompts = [shared + f"Question {i}: what is the capital of country number {i}?" for i in range(6)]
    prompts += ["Hi", "Name a color.", "Say yes."]

    def one(i_prompt):
        i, prompt = i_prompt
        messages = [{"role": "user", "content": prompt}]
        if i % 2:
            return list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True))
        return client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(one, enumerate(prompts)))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    return len(prompts) + 1


def _wait_scraped(server: prom.Prometheus, requests: int, timeout_s: float = 60) -> None:
    """Until Prometheus has scraped all three processes after the load, and twice more (rates need
    two samples after the last change)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        up = prom.finite(server.query("up"))
        seen = sum(prom.finite(server.query("sum(baton_router_requests_total)")))
        if len(up) == 3 and all(v == 1 for v in up) and seen >= requests:
            time.sleep(2.5)
            return
        time.sleep(0.5)
    raise AssertionError(f"not scraped: up={server.query('up')}\n{server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def loaded(prometheus, baton_up):
    _wait_scraped(prometheus, 0)
    _wait_scraped(prometheus, _send_load(baton_up))
    return prometheus


def test_targets_are_the_router_and_every_worker(loaded):
    targets = loaded.api("targets")["activeTargets"]
    assert sorted(t["labels"]["component"] for t in targets) == ["decode", "prefill", "router"]
    assert all(t["health"] == "up" for t in targets), targets
    router = loaded.query('baton_router_worker_healthy')
    assert {s["metric"]["worker"] for s in router} == {t["labels"]["worker"] for t in targets if "worker" in t["labels"]}


def test_every_dashboard_expression_returns_data(loaded):
    expressions = prom.dashboard_expressions(RATE_WINDOW)
    assert len(expressions) >= 20
    empty = []
    for title, expr in expressions:
        if not prom.finite(loaded.query(expr)):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_alert_expression_parses_and_its_signal_returns_data(loaded):
    rules = prom.alert_rules()
    assert {r["alert"] for r in rules} >= QUIET_ALERTS | {"BatonTTFTOverSLO"}
    for rule in rules:
        loaded.query(rule["expr"])  # parses and evaluates
        signal = prom.alert_signal(rule["expr"])
        assert prom.finite(loaded.query(signal)), f"{rule['alert']}: no data for {signal}"


def test_prometheus_evaluates_every_rule_and_the_healthy_cluster_raises_no_alert(loaded):
    deadline = time.monotonic() + 20
    while True:
        rules = [r for g in loaded.api("rules")["groups"] for r in g["rules"]]
        if all(r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == len(prom.alert_rules())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    active = {a["labels"]["alertname"] for a in loaded.api("alerts")["alerts"]}
    assert not active & QUIET_ALERTS, active


def test_every_series_name_exists_and_is_documented(loaded):
    read = set()
    for _, expr in prom.dashboard_expressions(RATE_WINDOW):
        read |= prom.metric_names(expr)
    for rule in prom.alert_rules():
        read |= prom.metric_names(rule["expr"])
    missing = sorted(name for name in read if not loaded.query(f'count({{__name__="{name}"}})'))
    assert not missing, missing
    exported = {re.sub(r"_(bucket|sum|count)$", "", n) for n in loaded.api("label/__name__/values")
                if n.startswith("baton_") and not n.endswith("_created")}
    doc = (REPO / "docs" / "metrics.md").read_text()
    undocumented = sorted(n for n in exported if f"`{n}`" not in doc and f"`{n.removesuffix('_total')}`" not in doc)
    assert not undocumented, f"add to docs/metrics.md: {undocumented}"
    assert {"baton_router_requests_total", "baton_worker_kv_usage", "baton_kv_transfer_bytes_total"} <= exported

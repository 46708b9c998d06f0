"""bench.serving runner, report, plots, schema and server metrics without a real server:
a fake client with known service times, the router's own metrics registry, and a free port
with nothing listening (the unreachable-server case)."""
from __future__ import annotations

import asyncio
import json
import math
import time

import jsonschema
import numpy as np
import pytest
from prometheus_client import generate_latest

from baton.bench.serving import result_schema, runner
from baton.bench.serving.config import BenchConfig
from baton.bench.serving.datasets import build_dataset
from baton.bench.serving.metrics import RequestRecord
from baton.bench.serving.report import Progress
from baton.bench.serving.server_metrics import baton_report, parse
from baton.deploy.cli import main as cli_main
from baton.router.metrics import RouterMetrics
from baton.services.common.server import free_port
from tests.helpers.tiny_models import word_tokenizer


class FakeClient:
    """Answers every request with two chunks after `service_s`; can fail chosen (session, turn)s."""

    def __init__(self, *args, service_s: float = 0.04, fail: frozenset = frozenset(), metrics=None, **kwargs):
        self.service_s, self.fail, self.metrics = service_s, fail, metrics
        self.in_flight = self.max_in_flight = 0
        self.calls: list[tuple[int, int, list]] = []
        self.root = "http://fake"
        self.t0 = time.perf_counter()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def set_clock(self, t0):
        self.t0 = t0

    def now(self):
        return time.perf_counter() - self.t0

    async def first_model(self):
        return "fake-model"

    async def get_text(self, path):
        return self.metrics() if (self.metrics and path == "/metrics") else None

    async def send(self, model, messages, max_tokens, est, session=0, turn=0):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.calls.append((session, turn, messages))
        rec = RequestRecord(session=session, turn=turn, start=self.now(), max_tokens=max_tokens, prompt_tokens=est)
        try:
            await asyncio.sleep(self.service_s / 2)
            if (session, turn) in self.fail:
                rec.end, rec.error_kind, rec.error = self.now(), "http_503", "no worker"
                return rec
            rec.chunk_times.append(self.now())
            await asyncio.sleep(self.service_s / 2)
            rec.chunk_times.append(self.now())
            rec.end, rec.output_tokens, rec.success, rec.text = self.now(), 2, True, f"reply {session}.{turn}"
            return rec
        finally:
            self.in_flight -= 1


def send(client, sessions, **kw):
    return asyncio.run(runner.send_sessions(client, "m", sessions, **kw))


def test_arrival_gaps_are_poisson_with_the_rate():
    rng = np.random.default_rng(0)
    gaps = runner.arrival_gaps(rng, 4.0, 1.0, 20000)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03) and gaps.std() == pytest.approx(0.25, rel=0.05)
    bursty = runner.arrival_gaps(rng, 4.0, 0.25, 20000)
    assert bursty.mean() == pytest.approx(0.25, rel=0.05) and bursty.std() == pytest.approx(0.5, rel=0.08)
    assert not runner.arrival_gaps(rng, math.inf, 1.0, 5).any()


def test_max_concurrency_is_respected():
    client = FakeClient()
    records = send(client, build_dataset(BenchConfig(num_prompts=10, input_len=3), 0), rate=math.inf,
                   max_concurrency=3)
    assert len(records) == 10 and all(r.success for r in records)
    assert client.max_in_flight == 3
    unlimited = FakeClient()
    send(unlimited, build_dataset(BenchConfig(num_prompts=10, input_len=3), 0), rate=math.inf)
    assert unlimited.max_in_flight == 10


def test_arrivals_follow_the_seeded_schedule():
    sessions = build_dataset(BenchConfig(num_prompts=6, input_len=3), 0)
    records = send(FakeClient(service_s=0.01), sessions, rate=20.0, seed=5)
    expected = np.concatenate([[0.0], np.cumsum(runner.arrival_gaps(np.random.default_rng([5, 2]), 20.0, 1.0, 5))])
    starts = np.array(sorted(r.start for r in records))
    assert np.all(starts >= expected - 0.005) and np.all(starts - expected < 0.25)


def test_multi_turn_sessions_run_in_order_and_stop_at_a_failure():
    sessions = build_dataset(BenchConfig(dataset="multi-turn", sessions=3, turns=3, input_len=3), 0)
    client = FakeClient(fail=frozenset({(1, 1)}))
    progress = Progress(total=9, enabled=False)
    records = send(client, sessions, rate=math.inf, progress=progress)
    by_session = {s: sorted((r for r in records if r.session == s), key=lambda r: r.turn) for s in range(3)}
    assert [len(v) for v in by_session.values()] == [3, 2, 3]
    assert progress.total == 8 and progress.done == 8 and progress.errors == 1
    for turns in by_session.values():
        for a, b in zip(turns, turns[1:]):
            assert b.start >= a.end
    last_messages = next(m for s, t, m in client.calls if (s, t) == (0, 2))
    assert [m["content"] for m in last_messages if m["role"] == "assistant"] == ["reply 0.0", "reply 0.1"]
    assert by_session[0][2].prompt_tokens == by_session[0][1].prompt_tokens + 2 + 3  # history + reply + new turn


def test_duration_cycles_the_workload_and_stops_sending():
    client = FakeClient(service_s=0.05)
    records = send(client, build_dataset(BenchConfig(num_prompts=3, input_len=3), 0), rate=math.inf,
                   max_concurrency=2, duration=0.4)
    assert 4 <= len(records) <= 18 and client.max_in_flight <= 2
    assert max(r.start for r in records) < 0.4 and len({r.session for r in records}) == len(records)


def router_page(metrics: RouterMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_baton_report_from_router_metrics():
    m = RouterMetrics()
    m.retries.labels(reason="prefill_failed").inc()
    m.requests.labels(api="chat", status="200").inc(5)
    before = parse(router_page(m))
    m.requests.labels(api="chat", status="200").inc(3)
    m.requests.labels(api="chat", status="404").inc(2)
    m.retries.labels(reason="prefill_failed").inc(2)
    m.migrations.inc()
    m.paths.labels(path="disaggregated").inc(2)
    m.paths.labels(path="decode_only").inc(1)
    m.ttft.observe(0.2)
    m.ttft.observe(0.4)
    workers = json.dumps([{"role": "decode", "address": "h:1", "load": {"prefix_hit_rate": 0.5}}])
    report = baton_report(before, parse(router_page(m)), workers, "x/metrics")
    assert report["is_baton"] and report["router"]["requests_by_status"] == {"200": 3.0, "404": 2.0}
    assert report["router"]["retries"] == 2 and report["router"]["retries_by_reason"] == {"prefill_failed": 2.0}
    assert report["router"]["migrations"] == 1
    assert report["router"]["paths"] == {"decode_only": 1.0, "disaggregated": 2.0}
    assert report["router"]["ttft_mean_ms"] == pytest.approx(300.0)
    assert report["prefix_cache_hit_rate"] is None and report["kv_transfer_bytes"] is None
    assert any("kv_bytes_received" in u for u in report["unavailable"])
    assert report["workers_prefix_hit_rate"] == {"decode@h:1": 0.5}
    assert not baton_report(None, parse("plain_metric 1\n"))["is_baton"]
    assert baton_report(None, None)["available"] is False


def test_whole_document_validates_and_plots(tmp_path, monkeypatch, capsys):
    m = RouterMetrics()
    client = FakeClient(fail=frozenset({(2, 0)}), metrics=lambda: router_page(m))
    monkeypatch.setattr(runner, "BenchClient", lambda *a, **k: client)
    word_tokenizer().save_pretrained(tmp_path / "tok")
    config = BenchConfig(num_prompts=5, input_len=4, output_len=2, sweep_rates="50,inf", slo="ttft=1000",
                         warmup=2, output=str(tmp_path / "r.json"), plot=str(tmp_path / "plots"), progress=False,
                         tokenizer=str(tmp_path / "tok"))
    assert runner.main(config, command="baton bench --fake") == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema.Draft202012Validator(result_schema()).validate(doc)
    assert doc["command"] == "baton bench --fake" and doc["server"]["model"] == "fake-model"
    assert doc["server"]["tokenizer"] == str(tmp_path / "tok") and doc["server"]["tokenizer_source"] == "--tokenizer"
    assert all(r["workload"]["prompts"] == "tokenizer" for r in doc["runs"])
    assert all(len(m[-1]["content"].split()) == 4 for _, _, m in client.calls)  # 4 tokens of the word vocabulary
    assert doc["runs"][0]["coalescing"]["tokens_counted_by"] == "events"  # the fake sends no chunk texts
    assert [r["request_rate"] for r in doc["runs"]] == [50.0, "inf"] and doc["sweep"]["request_rate"] == [50.0, "inf"]
    assert all(r["completed"] == 4 and r["errors"] == {"http_503": 1} for r in doc["runs"])
    assert doc["runs"][0]["server_metrics"]["is_baton"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "latency_cdf.png", "sweep_goodput.png", "sweep_ttft.png", "throughput_over_time.png"]
    out = capsys.readouterr().out
    assert out.count("Serving Benchmark Result") == 2 and "Sweep" in out and "http_503" in out
    assert "Network reads carrying > 1 chunk (%):" in out and "ITL per token" in out


def test_unreachable_server_gives_an_error_summary(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli_main(["bench", "--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "3",
                   "--input-len", "4", "--output-len", "2", "--request-timeout", "10", "--output", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    jsonschema.Draft202012Validator(result_schema()).validate(doc)
    run = doc["runs"][0]
    assert run["completed"] == 0 and run["errors"] == {"connection_error": 3} and run["goodput"] == 0
    assert run["server_metrics"]["available"] is False
    printed = capsys.readouterr().out
    assert "connection_error" in printed and "Failed requests" in printed


def test_worker_counters_reexported_by_the_router_give_run_figures():
    from baton.protos.baton.v1 import worker_pb2
    from baton.router.metrics import RouterMetrics, WorkerCountersCollector
    from baton.router.types import Role

    class Entry:  # what the registry holds: an address, a role and the latest load report
        def __init__(self, address, role, **load):
            self.address, self.role, self.load = address, role, worker_pb2.WorkerLoad(**load)
    entries = [Entry("d:1", Role.DECODE, prefix_tokens_matched=10, prefix_tokens_looked_up=100, kv_bytes_received=500),
               Entry("p:1", Role.PREFILL, prefix_tokens_matched=0, prefix_tokens_looked_up=100, kv_bytes_sent=500)]
    m = RouterMetrics()
    m.registry.register(WorkerCountersCollector(lambda: entries))
    before = parse(router_page(m))
    entries[0].load.prefix_tokens_matched, entries[0].load.prefix_tokens_looked_up = 70, 200
    entries[0].load.kv_bytes_received, entries[0].load.kv_transfer_failures = 1500, 1
    entries[1].load.prefix_tokens_looked_up = 200
    report = baton_report(before, parse(router_page(m)))
    assert report["prefix_cache_hit_rate"] == pytest.approx(60 / 200)
    assert report["kv_transfer_bytes"] == 1000 and report["kv_transfer_failures"] == 1
    assert report["unavailable"] == []

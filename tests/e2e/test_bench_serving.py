"""`baton bench` against a real `baton up` (embedded SmolLM2 on CPU, one prefill and one
decode worker over tcp), started once for the module: a short run of every dataset gives
every figure, consistent with each other (TTFT <= E2E, throughput = tokens / duration,
goodput <= throughput, token counts from usage), the router's counters from /metrics, a
JSON file that validates against bench/serving/result_schema.json and the PNG charts; a
wrong model name gives an error summary with the 404s counted by kind. Prompts come from
the served model's tokenizer (found by the bench): exact lengths, no shared prefixes, ITL
per token. First, `bench.gpu_serving` starts its own `baton up`, measures both workloads
(shrunk with --set) at one rate, stops it with SIGINT and writes its JSON and tables."""
import json
import sys

import jsonschema
import pytest

from baton.bench import gpu_serving
from baton.bench.serving import result_schema
from baton.deploy.cli import main as cli_main
from tests.helpers.workers import REPO

STATS = ("mean", "median", "p90", "p99", "min", "max")


def bench(url, tmp_path, *flags):
    """Run `baton bench` in-process; returns (exit code, the JSON document, validated)."""
    out = tmp_path / "result.json"
    rc = cli_main(["bench", "--base-url", url, "--no-progress", "--output", str(out), *flags])
    doc = json.loads(out.read_text())
    jsonschema.Draft202012Validator(result_schema()).validate(doc)
    return rc, doc


def check_run(run, requests, output_lens=None):
    """Every figure present and consistent with the others."""
    assert run["num_requests"] == run["completed"] == requests and run["failed"] == 0 and run["errors"] == {}
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert all(run[key][s] is not None and run[key][s] > 0 for s in STATS), key
    assert run["ttft_ms"]["mean"] <= run["e2e_ms"]["mean"] and run["ttft_ms"]["max"] <= run["e2e_ms"]["max"]
    for r in run["requests"]:
        assert r["success"] and 0 < r["ttft_ms"] <= r["e2e_ms"] and r["prompt_tokens"] > 0
        assert len(r["itl_ms"]) >= 1 and r["output_tokens"] == r["max_tokens"]  # ignore_eos honoured
        assert r["cached_tokens"] is not None
    duration = run["duration_s"]
    assert duration > 0
    assert run["request_throughput"] == pytest.approx(run["completed"] / duration)
    assert run["input_throughput"] == pytest.approx(run["total_input_tokens"] / duration)
    assert run["output_throughput"] == pytest.approx(run["total_output_tokens"] / duration)
    assert run["total_token_throughput"] == pytest.approx(
        (run["total_input_tokens"] + run["total_output_tokens"]) / duration)
    assert run["goodput"] <= run["request_throughput"] + 1e-9
    assert run["total_output_tokens"] == sum(r["max_tokens"] for r in run["requests"])
    if output_lens is not None:
        assert {r["max_tokens"] for r in run["requests"]} == set(output_lens)
    assert run["input_tokens_counted_by"] == run["output_tokens_counted_by"] == "usage"
    assert 0.0 <= run["prefix_cache_hit_rate"] <= 1.0
    server = run["server_metrics"]
    assert server["is_baton"] and server["router"]["requests_by_status"] == {"200": float(requests)}
    assert sum(server["router"]["paths"].values()) == requests and server["router"]["retries"] == 0
    assert server["router"]["ttft_mean_ms"] > 0 and server["workers_prefix_hit_rate"]
    assert server["unavailable"] == [] and 0.0 <= server["prefix_cache_hit_rate"] <= 1.0
    assert server["kv_transfer_bytes"] >= 0 and server["kv_transfer_failures"] == 0
    series = run["throughput_over_time"]
    assert sum(series["output_tokens_per_s"]) * series["bin_s"] == pytest.approx(run["total_output_tokens"])


def test_gpu_serving_driver_on_its_own_baton_up(tmp_path, monkeypatch, capsys, default_model_path):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "serving"
    command = f"{sys.executable} -m baton.deploy.cli up --port {{port}} --kv-cache-tokens 16384"
    rc = gpu_serving.main(["--server", f"baton={command}", "--rates", "8", "--num-prompts", "3", "--warmup", "1",
                           "--ready-timeout", "240", "--out", str(out), "--set", "input_len=48",
                           "--set", "input_len_min=16", "--set", "output_len=6", "--set", "output_len_min=2",
                           "--set", "sharegpt_output_len=4", "--set", "sharegpt_max_input_len=64"])
    assert rc == 0, (out / "baton.log").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["baton.json", "baton.log", "baton.md", "summary.md"]
    result = json.loads((out / "baton.json").read_text())
    assert result["error"] is None and result["ready_s"] > 0
    assert result["stop"]["signals"] == ["SIGINT"] and result["stop"]["exit_code"] == 0  # a clean stop
    assert set(result["workloads"]) == {"prefill-heavy", "decode-heavy"}
    for name, doc in result["workloads"].items():
        full = {**doc, "plots": [], "runs": [{**run, "requests": []} for run in doc["runs"]]}  # as --output writes
        jsonschema.Draft202012Validator(result_schema()).validate(full)
        assert doc["server"]["tokenizer_source"] == "Baton's embedded default model"
        assert doc["config"]["slo"] == "ttft=1000,tpot=50" and doc["config"]["endpoint"] == "completions"
        run = doc["runs"][0]
        assert run["completed"] == 3 and run["failed"] == 0 and "requests" not in run
        assert run["coalescing"]["chunks"] >= 3 and run["itl_ms"]["median"] > 0
    prefill = result["workloads"]["prefill-heavy"]["runs"][0]
    assert 3 * 16 <= prefill["total_input_tokens"] <= 3 * 48  # the prompts' exact lengths, from usage
    table = (out / "summary.md").read_text()
    assert "| baton | prefill-heavy | 8.0 |" in table and "| baton | decode-heavy | 8.0 |" in table
    assert table == (out / "baton.md").read_text() and table in capsys.readouterr().out


def test_exact_prompts_and_per_token_itl(baton_up, tmp_path, capsys):
    rc, doc = bench(baton_up, tmp_path, "--endpoint", "completions", "--num-prompts", "4", "--input-len", "40",
                    "--output-len", "5", "--request-rate", "20")
    assert rc == 0
    assert doc["server"]["tokenizer_source"] == "Baton's embedded default model"
    run = doc["runs"][0]
    check_run(run, 4, output_lens=[5])
    assert run["workload"]["prompts"] == "tokenizer"
    for r in run["requests"]:
        assert r["prompt_tokens"] == 40  # the completions prompt is exactly the requested tokens
        assert r["cached_tokens"] == 0  # no prefix shared with any earlier prompt
        assert r["tokens_counted_by"] in ("usage", "tokenizer") and r["chunk_reads"] is not None
        first_read = next((i for i, x in enumerate(r["chunk_reads"]) if x != r["chunk_reads"][0]), None)
        first_tokens = sum(r["chunk_tokens"][:first_read])  # the first read's chunks: TTFT, no gaps
        assert len(r["itl_ms"]) == sum(r["chunk_tokens"]) - first_tokens and sum(r["chunk_tokens"]) <= 5
    c = run["coalescing"]
    assert c["tokens_counted_by"] in ("usage", "tokenizer") and c["reads"] >= 4
    assert 0.0 <= c["multi_token_chunk_fraction"] <= 1.0 and 0.0 <= c["multi_chunk_read_fraction"] <= 1.0
    assert "Network reads carrying > 1 chunk" in capsys.readouterr().out


def test_random_sweep_with_slos_json_and_plots(baton_up, tmp_path, capsys):
    rc, doc = bench(baton_up, tmp_path, "--num-prompts", "3", "--input-len", "24", "--output-len", "4",
                    "--sweep-rates", "8,inf", "--slo", "ttft=60000,tpot=60000,e2e=60000", "--warmup", "1",
                    "--plot", str(tmp_path / "plots"))
    assert rc == 0 and doc["server"]["model"] == "SmolLM2-135M-Instruct"
    assert doc["config"]["sweep_rates"] == "8,inf" and doc["config"]["dataset"] == "random"
    assert [r["request_rate"] for r in doc["runs"]] == [8.0, "inf"] and [r["seed"] for r in doc["runs"]] == [0, 1]
    for run in doc["runs"]:
        check_run(run, 3, output_lens=[4])
        assert run["good_requests"] == 3 and run["goodput"] == pytest.approx(run["request_throughput"])
    assert doc["sweep"]["goodput"] == [r["goodput"] for r in doc["runs"]]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "latency_cdf.png", "sweep_goodput.png", "sweep_ttft.png", "throughput_over_time.png"]
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in ("latency_cdf.png", "sweep_ttft.png"))
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Goodput" in printed and "Sweep" in printed
    assert "Retries:" in printed and "KV transfer bytes" in printed


@pytest.mark.parametrize("dataset, flags, requests", [
    ("sharegpt-like", ["--num-prompts", "3", "--sharegpt-output-len", "3", "--sharegpt-max-input-len", "96"], 3),
    ("shared-prefix", ["--prefix-groups", "2", "--questions-per-group", "2", "--prefix-len", "64",
                       "--input-len", "8", "--output-len", "3", "--max-concurrency", "2"], 4),
    ("multi-turn", ["--sessions", "2", "--turns", "2", "--input-len", "12", "--output-len", "3",
                    "--endpoint", "completions"], 4),
])
def test_each_dataset(baton_up, tmp_path, dataset, flags, requests):
    rc, doc = bench(baton_up, tmp_path, "--dataset", dataset, "--request-rate", "20", *flags)
    assert rc == 0
    run = doc["runs"][0]
    check_run(run, requests, output_lens=[3])
    if dataset == "shared-prefix":
        assert run["workload"]["groups"] == 2 and run["cached_tokens"] > 0
    if dataset == "multi-turn":
        turns = sorted((r["session"], r["turn"], r["prompt_tokens"]) for r in run["requests"])
        assert turns[1][2] > turns[0][2] + 3 and turns[3][2] > turns[2][2] + 3  # history resent


def test_file_dataset(baton_up, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n'
                       '{"prompt": "Name two colors.", "system": "Answer briefly.", "output_len": 5}\n')
    rc, doc = bench(baton_up, tmp_path, "--dataset", "file", "--dataset-path", str(prompts), "--num-prompts", "2",
                    "--output-len", "3")
    assert rc == 0
    check_run(doc["runs"][0], 2, output_lens=[3, 5])


def test_wrong_model_is_an_error_summary(baton_up, tmp_path, capsys):
    rc, doc = bench(baton_up, tmp_path, "--model", "no-such-model", "--num-prompts", "3", "--input-len", "4",
                    "--output-len", "2")
    assert rc == 1
    run = doc["runs"][0]
    assert run["completed"] == 0 and run["errors"] == {"http_404": 3} and run["goodput"] == 0
    assert "no-such-model" in run["error_examples"]["http_404"]
    assert run["server_metrics"]["router"]["requests_by_status"] == {"404": 3.0}
    printed = capsys.readouterr().out
    assert "http_404:" in printed and "Failed requests:" in printed

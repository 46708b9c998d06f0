"""bench.gpu_serving without a GPU: its flags, the per-workload BenchConfigs, the markdown table
built from a saved result, and the server lifecycle (ready, stop by signal, early exit) on a
few-line Python HTTP server."""
from __future__ import annotations

import shlex
import subprocess
import sys
import textwrap

import pytest

from baton.bench import gpu_serving as gs
from baton.services.common.server import free_port


def test_flags_and_workload_configs():
    config = gs.parse_args(["--server", "vllm=vllm serve /m --port {port}", "--server", "baton=baton up --port {port}",
                            "--rates", "4,8", "--num-prompts", "50", "--tokenizer", "/m", "--workloads",
                            "prefill-heavy", "--set", "max_concurrency=64", "--set", "output-len-min=none",
                            "--set", "ignore_eos=false", "--out", "/tmp/x"])
    assert [s.name for s in config.servers] == ["vllm", "baton"] and config.servers[0].command.endswith("{port}")
    assert config.workloads == ("prefill-heavy",) and config.overrides == {
        "max_concurrency": 64, "output_len_min": None, "ignore_eos": False}
    bench = gs.bench_config(config, "prefill-heavy", "http://h:1")
    assert (bench.dataset, bench.input_len, bench.input_len_min, bench.output_len) == ("random", 2048, 256, 384)
    assert bench.output_len_min is None and bench.max_concurrency == 64 and not bench.ignore_eos
    assert bench.rates() == [4.0, 8.0] and bench.slos() == {"ttft": 1000.0, "tpot": 50.0}
    assert bench.num_prompts == 50 and bench.tokenizer == "/m" and bench.endpoint == "completions"
    default = gs.parse_args(["--server", "a=cmd"])
    assert default.workloads == ("prefill-heavy", "decode-heavy") and default.rates == "4,8,16,24"
    assert default.num_prompts == 400 and gs.bench_config(default, "decode-heavy", "u").dataset == "sharegpt-like"
    small = gs.bench_config(default, "prefill-heavy", "u")
    assert small.output_len_min == 32
    for bad in (["--server", "no-equals"], ["--server", "a b=c"], ["--server", "a=x", "--workloads", "nope"],
                ["--server", "a=x", "--server", "a=y"], ["--server", "a=x", "--set", "colour=red"],
                ["--server", "a=x", "--set", "num_prompts=many"], ["--server", "a=x", "--rates", "0"]):
        with pytest.raises(SystemExit):
            gs.parse_args(bad)


def saved_result(name, goodput, error=None):
    def run(rate, ttft, itl, failed, multi_chunk, multi_read):
        return {"request_rate": rate, "goodput": goodput, "request_throughput": 3.5, "output_throughput": 812.4,
                "ttft_ms": {"median": ttft, "p99": ttft * 4}, "itl_ms": {"median": itl, "p99": itl * 3},
                "failed": failed, "num_requests": 400, "completed": 400 - failed,
                "coalescing": {"multi_token_chunk_fraction": multi_chunk, "multi_chunk_read_fraction": multi_read}}
    doc = {"server": {"tokenizer_source": "--tokenizer"},
           "runs": [run(4.0, 120.25, 11.5, 0, 0.0, 0.125), run("inf", 900.0, 20.25, 3, None, None)]}
    return {"name": name, "command": f"{name} serve", "ready_s": 41.0, "error": error,
            "stop": {"signals": ["SIGINT"], "exit_code": 0}, "workloads": {} if error else {"prefill-heavy": doc}}


def test_markdown_table_from_saved_results():
    table = gs.markdown_table([saved_result("vllm", 3.25), saved_result("baton", 3.5),
                               saved_result("broken", 0.0, error="TimeoutError: no answer")])
    lines = table.splitlines()
    assert lines[0].startswith("Goodput SLO: ttft=1000, tpot=50 (ms)")
    assert lines[2] == "| " + " | ".join(gs.COLUMNS) + " |"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| server")]
    assert rows[0] == ("| vllm | prefill-heavy | 4.0 | 3.25 | 3.50 | 812 | 120.2 | 481.0 | 11.50 | 34.50 | 0/400 "
                       "| 0.0% | 12.5% |")
    assert rows[1].startswith("| vllm | prefill-heavy | inf | 3.25 |") and rows[1].endswith("| 3/400 | n/a | n/a |")
    assert rows[2].startswith("| baton | prefill-heavy | 4.0 | 3.50 |")
    assert rows[4].startswith("| broken | - | - | error: TimeoutError: no answer |")
    assert "- vllm: `vllm serve`; ready in 41.0 s; prompts from --tokenizer; stopped with SIGINT (exit 0)" in table


FAKE_SERVER = textwrap.dedent("""
    import http.server, signal, sys
    ignore_int = sys.argv[2] == "ignore-int"
    if ignore_int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.end_headers()
            self.wfile.write(b'{"data": []}')
        def log_message(self, *a):
            pass
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)
""")


def start_fake(tmp_path, mode="normal"):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {port} {mode}"
    proc = subprocess.Popen(["bash", "-c", command], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def test_server_lifecycle(tmp_path):
    proc, url = start_fake(tmp_path)
    assert gs.wait_ready(url, proc, timeout_s=30) < 30  # /v1/models 200, /health 404: ready
    stop = gs.stop_server(proc, grace_s=10)
    assert stop["signals"] == ["SIGINT"] and stop["exit_code"] == 0 and stop["clean"]
    stubborn, url = start_fake(tmp_path, "ignore-int")
    gs.wait_ready(url, stubborn, timeout_s=30)
    stop = gs.stop_server(stubborn, grace_s=0.5)
    assert stop["signals"] == ["SIGINT", "SIGTERM"] and stop["exit_code"] != 0 and not stop["clean"]
    dead = subprocess.Popen(["bash", "-c", "exit 3"], start_new_session=True)
    with pytest.raises(RuntimeError, match="code 3"):
        gs.wait_ready(f"http://127.0.0.1:{free_port()}", dead, timeout_s=30)
    assert gs.stop_server(dead, grace_s=1)["signals"] == []
    never = subprocess.Popen(["sleep", "30"], start_new_session=True)
    with pytest.raises(TimeoutError):
        gs.wait_ready(f"http://127.0.0.1:{free_port()}", never, timeout_s=0.5)
    assert gs.stop_server(never, grace_s=5)["signals"] == ["SIGINT"]

"""`baton up --sim-prefills 2 --sim-decodes 24`: the real router (its OpenAI gateway included)
in front of simulated workers, all of them in one child process: completions stream the
workers' deterministic tokens, a repeated long prompt is served from the cache the router
found through the workers' KV events (/workers says so per worker), the index size is a
metric, and SIGINT stops everything cleanly."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from baton.services.common.server import free_port
from tests.helpers.workers import REPO


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def test_baton_up_with_simulated_workers(default_model_path, tmp_path):
    port = free_port()
    log_path = tmp_path / "up.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", "up", "--sim-prefills", "2",
                             "--sim-decodes", "24", "--port", str(port), "--decode-only-threshold", "64"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while "Baton is up" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as reply:
            model = json.loads(reply.read())["data"][0]["id"]
        prompt = " ".join(f"word{i}" for i in range(300))
        first = post(url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 6})
        second = post(url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 6})
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        assert len(first["choices"][0]["text"].split()) == 6 and first["usage"]["completion_tokens"] == 6
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        prompt_tokens = second["usage"]["prompt_tokens"]
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - prompt_tokens % 16
        with urllib.request.urlopen(url + "/workers", timeout=10) as reply:
            workers = json.loads(reply.read())
        assert len(workers) == 26 and {w["prefix_source"] for w in workers} == {"kv_events"}
        with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
        entries = [line for line in metrics.splitlines() if line.startswith("baton_router_kv_index_entries ")]
        assert entries and float(entries[0].split()[1]) > 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log_path.read_text()[-4000:]

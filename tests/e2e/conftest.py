"""One real `baton up` (embedded SmolLM2 on CPU: a prefill and a decode worker over tcp and
the router) shared by the end-to-end tests of the session; stopped with SIGINT at the end,
which must exit cleanly. `baton_up` is its gateway URL; `baton_up_targets` the Prometheus
file_sd targets file it wrote (router and every worker's metrics endpoint)."""
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from baton.services.common.server import free_port
from tests.helpers.workers import REPO


@pytest.fixture(scope="session")
def _baton_up_process(default_model_path, tmp_path_factory):
    """(gateway URL, targets file) of a running `baton up`."""
    port = free_port()
    folder = tmp_path_factory.mktemp("up")
    log_path, targets = folder / "up.log", folder / "targets.json"
    secret = folder / "cluster.secret"  # known here, so a second router (tool_router) can join
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", "up", "--port", str(port),
                             "--decode-only-threshold", "16", "--kv-cache-tokens", "16384",
                             "--prometheus-targets", str(targets), "--cluster-secret-file", str(secret)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    while "Baton is up" not in log_path.read_text() or not targets.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}", targets
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, log_path.read_text()[-4000:]


@pytest.fixture(scope="session")
def baton_up(_baton_up_process) -> str:
    """The gateway URL of a running `baton up`."""
    return _baton_up_process[0]


@pytest.fixture(scope="session")
def baton_up_targets(_baton_up_process) -> Path:
    """The file_sd JSON `baton up --prometheus-targets` wrote for that cluster."""
    return _baton_up_process[1]


TOOL_TEMPLATE = REPO / "router" / "gateway" / "templates" / "smollm2_tool_hermes.jinja"
"""The Hermes-style tool chat template shipped for the embedded SmolLM2."""


@pytest.fixture(scope="session")
def tool_router(_baton_up_process, default_model_path, tmp_path_factory):
    """The gateway URL of a second router in front of the same `baton up` workers (found in its
    targets file), started with the SmolLM2 tool template, `--tool-call-parser hermes` and
    `--docs` (/openapi.json): the OpenAI tool, Responses, embeddings and OpenAPI tests use it."""
    import json

    from tests.helpers.workers import wait_http_ok
    workers = {"prefill": [], "decode": []}
    for entry in json.loads(_baton_up_process[1].read_text()):
        labels = entry["labels"]
        if labels["component"] in workers:
            workers[labels["component"]].append(labels["worker"])
    port = free_port()
    log_path = tmp_path_factory.mktemp("tool-router") / "router.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.deploy.cli", "router", "--model", str(default_model_path),
         "--http-port", str(port), "--grpc-port", str(free_port()), "--prefill", ",".join(workers["prefill"]),
         "--decode", ",".join(workers["decode"]), "--decode-only-threshold", "16", "--health-interval-s", "0.2",
         "--chat-template", str(TOOL_TEMPLATE), "--tool-call-parser", "hermes", "--docs",
         "--cluster-secret-file", str(_baton_up_process[1].parent / "cluster.secret")],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(url + "/health", proc, log_path)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, log_path.read_text()[-4000:]

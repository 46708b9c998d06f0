"""`baton up` supervises its cluster (a tiny random-weight model on CPU, one decode worker):
the router killed with SIGKILL comes back on the same gateway port and serves; a worker killed
with SIGKILL is restarted on its address, the router finds it again and requests succeed; every
exit and restart is in the log; and `baton up` still exits cleanly (0) on SIGINT."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from baton.services.common.server import free_port
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.workers import REPO


def wait_for(predicate, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log()[-4000:]}")


def complete(url: str) -> int:
    body = json.dumps({"prompt": "w5 w6 w7", "max_tokens": 4}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@pytest.fixture
def baton_up(tmp_path):
    model = make_tiny_model("llama", tmp_path / "model")
    port = free_port()
    log_path = tmp_path / "up.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", "up", "--model", str(model), "--port", str(port),
                             "--prefills", "0", "--decodes", "1", "--kv-cache-tokens", "4096", "--page-size", "4",
                             "--health-interval-s", "0.2", "--restart-backoff-s", "0.5"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    log = log_path.read_text
    try:
        wait_for(lambda: "Baton is up" in log() or proc.poll() is not None, 240, "baton up", log)
        assert proc.poll() is None, log()[-4000:]
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log()[-4000:]


def pid_of(log: str, name: str) -> int:
    """The newest pid the log gives for a child (first start or restart)."""
    pids = re.findall(rf"(?:started {name} \(pid (\d+)\)|{name} restarted \(pid (\d+))", log)
    return int([a or b for a, b in pids][-1])


def test_router_and_worker_are_restarted(baton_up):
    url, proc, log = baton_up
    assert complete(url) == 200
    router = pid_of(log(), "router")
    os.kill(router, signal.SIGKILL)
    wait_for(lambda: "router restarted" in log(), 30, "the router's restart", log)
    assert re.search(rf"router \(pid {router}\) exited with code -9; restarting it in", log())
    assert pid_of(log(), "router") != router
    wait_for(lambda: complete(url) == 200, 60, "the restarted router to serve on the same port", log)

    worker = pid_of(log(), "decode-0")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: "decode-0 restarted" in log(), 30, "the worker's restart", log)
    assert re.search(rf"decode-0 \(pid {worker}\) exited with code -9", log())
    wait_for(lambda: complete(url) == 200, 90, "the restarted worker to serve through the router", log)
    assert proc.poll() is None  # baton up itself kept running throughout

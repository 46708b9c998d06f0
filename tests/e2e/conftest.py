"""One real `baton up` (embedded SmolLM2 on CPU: a prefill and a decode worker over tcp and
the router) shared by the end-to-end tests of the session; stopped with SIGINT at the end,
which must exit cleanly. `baton_up` is its gateway URL; `baton_up_targets` the Prometheus
file_sd targets file it wrote (router and every worker's metrics endpoint)."""
import os
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
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", "up", "--port", str(port),
                             "--decode-only-threshold", "16", "--kv-cache-tokens", "16384",
                             "--prometheus-targets", str(targets)],
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

"""Worker processes for integration tests: start `baton serve` on free ports, wait for
health, read metrics, and stop or kill them. Optional fault injection runs the worker
through `tests.helpers.faulty_worker`, which patches the process before it starts."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from baton.services.common.server import free_ports, wait_for_health

REPO = Path(__file__).resolve().parents[2]
_handed_out: set[int] = set()
"""Ports this test process gave to a worker or router: workers now load side by side, and a port picked
while an earlier one is not bound yet could otherwise come back from the kernel twice."""


def unused_ports(count: int) -> list[int]:
    """`count` free ports never handed out before by this test process."""
    while True:
        ports = free_ports(count)
        if not _handed_out.intersection(ports):
            _handed_out.update(ports)
            return ports


@dataclass
class WorkerProcess:
    """A running worker: its address, process and the flags that started it."""

    role: str
    address: str
    proc: subprocess.Popen
    args: list[str] = field(default_factory=list)
    log_path: Optional[Path] = None

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def metrics(self) -> str:
        """The worker's /metrics text."""
        port = re.search(r"metrics :(\d+)", self.log()).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the worker and wait for it; returns its exit code (killed if it hangs)."""
        return stop_process(self.proc, sig, timeout)


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> int:
    """Signal a process and wait for it (SIGKILL if it outlives `timeout`); its exit code."""
    return stop_processes([proc], sig, timeout)[0]


def stop_processes(procs: list[subprocess.Popen], sig: int = signal.SIGTERM,
                   timeout: float = 20) -> list[Optional[int]]:
    """Signal every process at once, then wait for them all (SIGKILL for any still running after
    `timeout`): the slowest drain bounds the shutdown, not the sum of them. Their exit codes, in order."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return [proc.returncode for proc in procs]


def stop_all(processes, sig: int = signal.SIGTERM, timeout: float = 20) -> list[Optional[int]]:
    """`stop_processes` over workers and routers (anything with a `proc`): a cluster's teardown."""
    return stop_processes([p.proc for p in processes], sig, timeout)


def start_worker(role: str, model: Path | str, tmp: Path, transfer: str = "tcp", port: int = 0,
                 fault: Optional[str] = None, wait: bool = True, **flags) -> WorkerProcess:
    """Start `baton serve ROLE` (optionally with a fault injected) and wait until SERVING."""
    port = port or unused_ports(1)[0]
    args = ["serve", role, "--model", str(model), "--port", str(port), "--transfer", transfer,
            "--num-threads", "1", "--drain-timeout-s", "10"]
    for key, value in {"page_size": 4, "kv_cache_tokens": 4096, **flags}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    module = ["tests.helpers.faulty_worker", fault] if fault else ["baton.deploy.cli"]
    env = dict(os.environ, UCX_NET_DEVICES="lo", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    log_path = tmp / f"{role}-{port}-{len(list(tmp.glob('*.log')))}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", *module, *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO)
    worker = WorkerProcess(role, f"127.0.0.1:{port}", proc, args, log_path)
    if wait:
        wait_serving(worker)
    return worker


def wait_all_serving(workers: list[WorkerProcess], timeout: float = 90) -> list[WorkerProcess]:
    """Block until every worker (started with wait=False, so they load side by side) is SERVING; the
    workers. One that fails stops the others before the error is raised."""
    try:
        for worker in workers:
            wait_serving(worker, timeout)
    except BaseException:
        stop_all(workers, signal.SIGKILL, 5)
        raise
    return workers


def wait_serving(worker: WorkerProcess, timeout: float = 90) -> None:
    """Block until the worker's health is SERVING (fails with its log otherwise)."""
    try:
        asyncio.run(wait_for_health(worker.address, timeout))
    except TimeoutError as error:
        worker.stop(signal.SIGKILL)
        raise AssertionError(f"{worker.role} did not become healthy: {error}\n{worker.log()[-3000:]}") from None
    for _ in range(100):  # the serving line (with the metrics port) follows health by a moment
        if "serving on" in worker.log():
            return
        asyncio.run(asyncio.sleep(0.05))


@dataclass
class RouterProcess:
    """A running `baton router`: its gateway URL and gRPC address."""

    http_url: str
    grpc_address: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 20) -> int:
        return stop_process(self.proc, signal.SIGTERM, timeout)


def start_router(model: Path | str, tmp: Path, prefill: list[str], decode: list[str],
                 **flags) -> RouterProcess:
    """Start `baton router` in front of the given workers and wait for its /health."""
    http_port, grpc_port = unused_ports(2)
    args = ["router", "--model", str(model), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            "--prefill", ",".join(prefill), "--decode", ",".join(decode)]
    env_overrides = flags.pop("env", {})
    for key, value in {"health_interval_s": 0.2, "health_timeout_s": 1.0, **flags}.items():
        if isinstance(value, bool):  # a --flag / --no-flag switch
            args.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    log_path = tmp / f"router-{http_port}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **env_overrides)
    proc = subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", *args], stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)
    router = RouterProcess(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc, log_path)
    wait_http_ok(router.http_url + "/health", proc, log_path)
    return router


def wait_http_ok(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    """Poll an HTTP URL until it answers 200 (fails with the process log otherwise)."""
    import time

    from baton.deploy.launcher import wait_http_ok as poll

    def alive() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    try:
        poll(url, time.monotonic() + timeout, alive, interval_s=0.1)
    except TimeoutError:
        raise AssertionError(f"{url} not healthy:\n{log_path.read_text()[-3000:]}") from None

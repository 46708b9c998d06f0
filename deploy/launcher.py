"""`baton up`: the whole cluster on one machine as local processes.

Starts N prefill and M decode workers (`baton serve`) on free ports, waits for each to
report SERVING, then starts the router (`baton router`) in front of them, waits for its
gateway's /health, prints every process's Prometheus endpoint (and writes them as a file_sd
targets file with `--prometheus-targets`) and the address, and stops everything cleanly
(SIGTERM, then SIGKILL after a grace period) on Ctrl-C or SIGTERM, and only then: meanwhile a
child that exits (the router or a worker) is restarted on its ports, with backoff
(deploy/supervisor.py). With no flags it serves
the embedded SmolLM2-135M-Instruct on this machine. With `--ray` the workers are Ray actors instead
(deploy/ray_launcher.py).
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from baton.deploy.placement import (MULTICAST_OFF, Placement, choose_transfer, parse_gpus, place_workers,
                                    visible_gpus)
from baton.router.config import RouterConfig
from baton.services.common.server import free_ports, wait_for_health
from baton.services.engine.config import EngineConfig
from baton.services.engine.engine_setup import resolve_model_path

if TYPE_CHECKING:
    from baton.deploy.ray_launcher import RayConfig


@dataclass(frozen=True)
class UpConfig:
    """The shape of the local cluster."""

    prefills: int = 1
    """Prefill workers to start (0: every request is prefilled by its decode worker)."""
    decodes: int = 1
    """Decode workers to start."""
    encoders: int = 0
    """Encoders to start for a vision-language model (`baton serve encoder`; 0: the workers run the vision tower)."""
    allowed_local_media_path: str = ""
    """A folder whose files image parts may name with file:// URLs (the router's flag)."""
    transfer: str = "auto"
    """KV transfer backend between them: tcp, nixl, cuda_ipc, nccl (opt-in: NCCL between GPUs, gloo on CPU), or auto (cuda_ipc when every worker is on one GPU, nixl across GPUs when installed, tcp on CPU)."""
    host: str = "127.0.0.1"
    """Address everything binds."""
    port: int = 0
    """HTTP port of the OpenAI-compatible gateway; 0 picks a free one (printed at start)."""
    grpc_port: int = 0
    """Port of the router's gRPC API; 0 picks a free one."""
    worker_threads: int = 1
    """torch CPU threads per worker process (several processes share the cores)."""
    decode_only_threshold: int = 256
    """Prompts with at most this many uncached tokens skip the prefill worker."""
    prefill_backlog_limit: int = RouterConfig.prefill_backlog_limit
    """Prompt tokens the least-loaded prefill worker may hold before decode workers prefill by themselves (0: never)."""
    api_keys: str = ""
    """Comma-separated API keys the gateway requires (empty: none; shows in `ps`: prefer --api-keys-file or $BATON_API_KEYS)."""
    api_keys_file: str = ""
    """File of API keys the gateway requires, comma- or newline-separated (the router reads it; $BATON_API_KEYS works too)."""
    admin_api_keys_file: str = ""
    """File of admin keys: registering / deregistering workers (and, with --protect-admin-endpoints, /metrics and /workers) needs one."""
    protect_admin_endpoints: bool = False
    """Put the router's /metrics, /workers and /docs behind an admin key."""
    cluster_secret_file: str = ""
    """File holding the cluster secret every worker and the router use (empty: a fresh random one in the run directory)."""
    open_cluster: bool = False
    """Start the workers without a cluster secret: anyone who reaches their ports may call them (not with --cluster-secret-file)."""
    worker_metrics_port: int = 0
    """First worker metrics port: prefill-0, prefill-1, ..., decode-0, ... count up from it (0: free ports)."""
    startup_timeout_s: float = 300.0
    """Longest wait for every process to become healthy."""
    gpus: str = ""
    """Comma-separated GPU indices to place workers on, one per GPU while there are enough (empty: every visible GPU; none on CPU)."""
    router_max_queued_requests: int = 1024
    """Requests the router holds while no worker has room; one more gets 429."""
    router_processes: int = 1
    """Router processes on the gateway's ports (`baton router --processes`): more than 1 spreads the router's CPU over cores."""
    request_timeout_s: float = RouterConfig.request_timeout_s
    """Deadline of a whole request at the router, first byte to last."""
    max_migrations: int = RouterConfig.max_migrations
    """Times a stream may move to another decode worker after its first token."""
    health_interval_s: float = RouterConfig.health_interval_s
    """Seconds between the router's health checks of each worker."""
    breaker_failures: int = RouterConfig.breaker_failures
    """Consecutive worker failures that open its circuit breaker."""
    breaker_cooldown_s: float = RouterConfig.breaker_cooldown_s
    """Seconds an open breaker waits before one trial request."""
    drain_timeout_s: float = 30.0
    """How long a stopping worker lets its running requests finish."""
    restart_backoff_s: float = 1.0
    """Wait before restarting a child (router or worker) that exited; doubles per restart in a row."""
    restart_backoff_max_s: float = 30.0
    """Longest wait between two restarts of one child (deploy/supervisor.py)."""
    prometheus_targets: str = ""
    """Write the Prometheus targets (router and every worker's metrics port) to this file_sd JSON file (empty: none)."""
    sim_prefills: int = 0
    """Simulated prefill workers (services/sim: no model, one process for all) instead of real ones."""
    sim_decodes: int = 0
    """Simulated decode workers instead of real ones (> 0: a simulated cluster, deploy/sim_cluster.py)."""
    chat_template: str = ""
    """Jinja chat-template file the router uses instead of the model's own (e.g. router/gateway/templates/smollm2_tool_hermes.jinja)."""
    tool_call_parser: str = ""
    """How the router reads tool calls: hermes, llama3_json or mistral; empty: implied by the chat template."""
    ray: str = ""
    """Run the workers as Ray actors on this Ray cluster (GCS host:port, auto, or ray://host:port; --ray-* flags); empty: local processes."""

    def __post_init__(self) -> None:
        if self.prefills < 0 or self.decodes < 1 or self.encoders < 0:
            raise ValueError("need prefills >= 0, decodes >= 1 and encoders >= 0")
        if self.transfer not in ("auto", "tcp", "nixl", "cuda_ipc", "nccl"):
            raise ValueError("transfer must be auto, tcp, nixl, cuda_ipc or nccl")
        parse_gpus(self.gpus)
        if self.router_processes < 1:
            raise ValueError("router_processes must be at least 1")
        if self.router_max_queued_requests < 1:
            raise ValueError("router_max_queued_requests must be at least 1")
        if self.open_cluster and self.cluster_secret_file:
            raise ValueError("--open-cluster and --cluster-secret-file exclude each other")
        if not 0 <= self.worker_metrics_port <= 65535:
            raise ValueError("worker_metrics_port must be in [0, 65535]")


ENGINE_FLAGS_SKIPPED = {"model", "num_threads", "mem_fraction_static", "device"}
"""Engine options `baton up` sets per worker itself (placement) or never passes on."""


def engine_flags(engine: EngineConfig) -> list[str]:
    """The engine options that differ from the defaults, as `baton serve` flags."""
    defaults = EngineConfig()
    args: list[str] = []
    for f in fields(EngineConfig):
        value = getattr(engine, f.name)
        if f.name in ENGINE_FLAGS_SKIPPED or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


class Cluster:
    """The child processes of one `baton up`."""

    def __init__(self, up: UpConfig, engine: EngineConfig) -> None:
        self.up = up
        self.engine = engine
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.gateway_url = ""
        self.metrics_targets: list[MetricsTarget] = []
        """Where Prometheus scrapes each process (filled by `start`)."""
        self.stop_requested = [False]
        """Set by a signal: start-up gives up (instead of waiting for its timeout) and `watch` returns."""
        self._commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        """Each child's command line and environment, by name (a restart runs it again)."""
        self.run_dir: Optional[Path] = None
        """Private directory (0700) of this cluster's generated files (the cluster secret, the keys file)."""

    def _spawn(self, name: str, args: list[str], extra_env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        env = dict(os.environ, UCX_NET_DEVICES=os.environ.get("UCX_NET_DEVICES", "lo"), **MULTICAST_OFF,
                   **(extra_env or {}))
        proc = subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", *args], env=env)
        self.procs.append((name, proc))
        self._commands[name] = (args, env)  # what `_respawn` runs again
        print(f"baton up: started {name} (pid {proc.pid})", file=sys.stderr, flush=True)
        return proc

    def _respawn(self, name: str) -> subprocess.Popen:
        """Start the named child again with its first command line (same ports)."""
        args, env = self._commands[name]
        return subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", *args], env=env)

    def start(self) -> str:
        """Start every process and wait until the gateway serves; returns its URL."""
        if self.engine.tp_size > 1 and self.up.prefills:
            raise ValueError(f"--tp {self.engine.tp_size}: a prefill worker cannot hand off a tensor-parallel KV cache "
                             "yet, so tensor parallelism runs decode workers only: add --prefills 0 (docs/parallel.md)")
        model = str(resolve_model_path(self.engine))
        roles = [(role, i) for role, count in (("prefill", self.up.prefills), ("decode", self.up.decodes),
                                               ("encoder", self.up.encoders)) for i in range(count)]
        gpus = parse_gpus(self.up.gpus) or visible_gpus(self.engine.device)
        placements = place_workers(len(roles), gpus, self.engine.mem_fraction_static, self.engine.tp_size)
        self.transfer = choose_transfer(self.up.transfer, placements)
        common = ["--model", model, "--host", self.up.host, "--transfer", self.transfer,
                  "--num-threads", str(self.up.worker_threads), "--drain-timeout-s", str(self.up.drain_timeout_s),
                  *engine_flags(self.engine), *self._secret_flags()]
        addresses: dict[str, list[str]] = {"prefill": [], "decode": [], "encoder": []}
        processes = self.up.router_processes
        # distinct, picked together before any child binds: each worker's pair, each router process's own pair
        # (with --router-processes), then the router's HTTP and gRPC ports
        ports = free_ports(2 * len(roles) + 2 + (2 * processes if processes > 1 else 0), self.up.host)
        for n, ((role, i), placement) in enumerate(zip(roles, placements)):
            port = ports[2 * n]
            metrics_port = self.up.worker_metrics_port + n if self.up.worker_metrics_port else ports[2 * n + 1]
            encoder_transfer = ["--transfer", "tcp"] if role == "encoder" and self.transfer in ("cuda_ipc", "nccl") else []
            self._spawn(f"{role}-{i}", ["serve", role, "--port", str(port), "--metrics-port", str(metrics_port),
                                        *common, *encoder_transfer, *self._placed(placement)], _visible_env(placement))
            addresses[role].append(f"{self.up.host}:{port}")
            self.metrics_targets.append(MetricsTarget(f"{role}-{i}", role, f"{self.up.host}:{metrics_port}",
                                                      f"{self.up.host}:{port}"))
        deadline = time.monotonic() + self.up.startup_timeout_s
        for address in addresses["prefill"] + addresses["decode"] + addresses["encoder"]:
            self._wait_grpc(address, deadline)
        http_port = self.up.port or ports[-2]
        self._spawn("router", ["router", "--model", model, "--host", self.up.host, "--http-port", str(http_port),
                               "--grpc-port", str(self.up.grpc_port or ports[-1]),  # kept on restart
                               "--prefill", ",".join(addresses["prefill"]),
                               "--decode", ",".join(addresses["decode"]), *self._key_flags(), *self._secret_flags(),
                               "--encoders", ",".join(addresses["encoder"]),
                               "--allowed-local-media-path", self.up.allowed_local_media_path,
                               "--decode-only-threshold", str(self.up.decode_only_threshold),
                               "--chat-template", self.up.chat_template, "--tool-call-parser", self.up.tool_call_parser,
                               "--prefill-backlog-limit", str(self.up.prefill_backlog_limit),
                               "--max-queued-requests", str(self.up.router_max_queued_requests),
                               *self._router_processes(http_port, ports[2 * len(roles):-2]),
                               *self._failover_flags()],
                    {"CUDA_VISIBLE_DEVICES": ""})
        self.gateway_url = f"http://{self.up.host}:{http_port}"
        self._wait_http(self.gateway_url + "/health", deadline)
        return self.gateway_url

    def _router_processes(self, http_port: int, own: list[int] | None = None) -> list[str]:
        """The router's Prometheus targets (first in the list) and its `--processes` flags: one target on the
        gateway port, or with `router_processes` > 1 one per process on its own port (`own`: their HTTP:gRPC
        pairs flattened, picked here when not given)."""
        count = self.up.router_processes
        if count == 1:
            self.metrics_targets.insert(0, MetricsTarget("router", "router", f"{self.up.host}:{http_port}"))
            return []
        own = own or free_ports(2 * count, self.up.host)
        self.metrics_targets[:0] = [MetricsTarget(f"router-{i}", "router", f"{self.up.host}:{own[2 * i]}")
                                    for i in range(count)]
        pairs = ",".join(f"{own[i]}:{own[i + 1]}" for i in range(0, len(own), 2))
        return ["--processes", str(count), "--process-ports", pairs]

    def _private_file(self, name: str, text: str) -> str:
        """Write `text` to a file readable by this user only, in the run directory; its path."""
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="baton-up-"))  # mode 0700
        path = self.run_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        return str(path)

    def _secret_flags(self) -> list[str]:
        """--cluster-secret-file for every process (generated once, unless the cluster is open)."""
        if self.up.open_cluster:
            return []
        if not getattr(self, "_secret_path", ""):
            self._secret_path = self.up.cluster_secret_file or self._private_file("cluster.secret",
                                                                                   secrets.token_hex(32) + "\n")
        return ["--cluster-secret-file", self._secret_path]

    def _key_flags(self) -> list[str]:
        """The router's key flags: keys travel in files, never on its command line."""
        up, flags = self.up, []
        keys = [k.strip() for k in up.api_keys.split(",") if k.strip()]
        if keys:  # the flag's keys (and the file's, if any) go in one private file
            extra = Path(up.api_keys_file).read_text() if up.api_keys_file else ""
            flags += ["--api-keys-file", self._private_file("api-keys", "\n".join(keys) + "\n" + extra)]
        elif up.api_keys_file:
            flags += ["--api-keys-file", up.api_keys_file]
        if up.admin_api_keys_file:
            flags += ["--admin-api-keys-file", up.admin_api_keys_file]
        if up.protect_admin_endpoints:
            flags.append("--protect-admin-endpoints")
        return flags

    def _failover_flags(self) -> list[str]:
        """The router's failover knobs as `baton up` was given them."""
        up = self.up
        return ["--request-timeout-s", str(up.request_timeout_s), "--max-migrations", str(up.max_migrations),
                "--health-interval-s", str(up.health_interval_s), "--breaker-failures", str(up.breaker_failures),
                "--breaker-cooldown-s", str(up.breaker_cooldown_s)]

    def _placed(self, placement: Placement) -> list[str]:
        """The worker's device and memory-share flags."""
        if placement.gpu is None:
            return [] if self.engine.device == "auto" else ["--device", self.engine.device]
        return ["--device", "cuda", "--mem-fraction-static", str(placement.mem_fraction)]

    def _wait_grpc(self, address: str, deadline: float) -> None:
        self._check_alive()
        asyncio.run(wait_for_health(address, max(1.0, deadline - time.monotonic())))

    def _wait_http(self, url: str, deadline: float) -> None:
        wait_http_ok(url, deadline, self._check_alive)

    def _check_alive(self) -> None:
        if self.stop_requested[0]:
            raise RuntimeError("interrupted during start-up")
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (router first), then SIGKILL what is left after the grace period."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def watch(self, stop_requested: "list[bool]") -> Optional[str]:
        """Block until asked to stop, restarting children that exit meanwhile, with backoff
        (deploy/supervisor.py): only Ctrl-C / SIGTERM ends `baton up`."""
        from baton.deploy.supervisor import RestartPolicy, Supervisor
        policy = RestartPolicy(self.up.restart_backoff_s, self.up.restart_backoff_max_s)
        supervisor = Supervisor(self.procs, self._respawn, policy, now=time.monotonic())
        while not stop_requested[0]:
            supervisor.check(time.monotonic())
            self.tick()
            time.sleep(0.2)
        return None

    def write_targets(self) -> None:
        """Write the Prometheus file_sd targets when `--prometheus-targets` asks for them."""
        if self.up.prometheus_targets:
            write_file_sd(Path(self.up.prometheus_targets), self.metrics_targets)

    def tick(self) -> None:
        """Called every 0.2 s while `watch` runs (a Ray cluster follows its restarted actors)."""


@dataclass(frozen=True)
class MetricsTarget:
    """One process's Prometheus endpoint (`http://ADDRESS/metrics`)."""

    name: str
    """Process name (router, prefill-0, decode-1, ...)."""
    component: str
    """router, prefill or decode (the `component` target label)."""
    address: str
    """host:port of its /metrics."""
    worker: str = ""
    """A worker's gRPC host:port, the name the router's `worker` labels use (the `worker` target label)."""


def write_file_sd(path: Path, targets: list[MetricsTarget]) -> None:
    """Write Prometheus file_sd entries (one per process, labelled with its component and a worker's
    gRPC address) atomically, so a Prometheus watching the file never reads half of it."""
    entries = [{"targets": [t.address], "labels": {"component": t.component, **({"worker": t.worker} if t.worker else {})}}
               for t in targets]
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(entries, indent=1))
    partial.replace(path)


def _visible_env(placement: Placement) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a placed worker: its physical GPU (indices given to `--gpus`
    count within the launcher's own CUDA_VISIBLE_DEVICES when that is set)."""
    if placement.gpu is None:
        return {}
    inherited = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if inherited:
        for gpu in placement.all_gpus:
            if gpu >= len(inherited):
                raise ValueError(f"GPU {gpu} is not among CUDA_VISIBLE_DEVICES={','.join(inherited)}")
        return {"CUDA_VISIBLE_DEVICES": ",".join(inherited[gpu] for gpu in placement.all_gpus)}
    return placement.env()


def wait_http_ok(url: str, deadline: float, check_alive: Callable[[], None] = lambda: None,
                 interval_s: float = 0.2) -> None:
    """Poll `url` until it answers 200 or the monotonic `deadline` passes (TimeoutError);
    `check_alive` runs before every try and raises when the process behind it died."""
    while time.monotonic() < deadline:
        check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{url} did not answer 200 in time")


def run_up(up: UpConfig, engine: EngineConfig, ray_config: Optional["RayConfig"] = None) -> int:
    """Start the cluster (its workers on Ray with `up.ray`), serve until Ctrl-C / SIGTERM, then
    stop it; returns the exit code."""
    if up.ray:
        from baton.deploy.ray_launcher import RayCluster, RayConfig
        cluster: Cluster = RayCluster(up, engine, ray_config or RayConfig())
    elif up.sim_decodes:
        from baton.deploy.sim_cluster import SimulatedCluster
        cluster = SimulatedCluster(up, engine)
    else:
        cluster = Cluster(up, engine)
    stop_requested = cluster.stop_requested

    def request_stop(signum, frame) -> None:
        stop_requested[0] = True
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = cluster.start()
        cluster.write_targets()
        print("Metrics targets: " + " ".join(f"{t.name}={t.address}" for t in cluster.metrics_targets), flush=True)
        print(f"Baton is up: OpenAI-compatible API at {url}/v1 (dashboard {url}/ , metrics {url}/metrics). "
              f"Ctrl-C stops it.", flush=True)
        problem = cluster.watch(stop_requested)
        return 1 if problem else 0
    except (RuntimeError, TimeoutError, ValueError, OSError) as error:  # OSError: FileNotFound, Ray unreachable
        print(f"baton up: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("baton up: stopping", file=sys.stderr, flush=True)
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

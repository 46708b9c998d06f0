"""`baton up --ray ADDRESS|auto`: the cluster with its workers as Ray actors, across machines.

Every prefill, decode and encoder worker is one Ray actor (`WorkerActor`) named `PREFIX-ROLE-N` in one
Ray namespace, holding `--ray-gpus-per-worker` GPUs (0 on CPU; Ray sets the actor's
CUDA_VISIBLE_DEVICES) and `--ray-cpus-per-worker` CPUs. The router runs on this machine, as
with `baton up`, and finds the workers through Ray, not through a list: it joins the cluster as
a driver and asks the named actors for their gRPC addresses every `--ray-discovery-interval-s`
(router/ray_discovery.py, through router/discovery.py's rules). Encoders (`--encoders N`, a
vision-language model) run `baton serve encoder`'s `serve_encoder` the same way; the router
follows the `PREFIX-encoder` actors as its encoder pool (`--discover-encoders PREFIX-encoder:0`,
resolved through Ray).

The actor process is the worker. The actor runs the very `serve_worker` of `baton serve ROLE`
in its own process (a thread with the worker's event loop; the engine has its thread as
always) rather than owning a `baton serve` subprocess, because that is what survives a restart
cleanly: when the actor dies (killed, OOM, a crash, its node lost) the worker dies with it,
freeing its port and GPU memory, and Ray's restart (`max_restarts`) starts a fresh worker
(new port, new epoch) that the router picks up. A child process would outlive a SIGKILLed actor
(still holding the GPU and answering on the old address), and one that crashed alone would
leave a live actor that Ray never restarts. For the same reason a worker that stops by itself
takes the actor process down with it (Ray restarts it), and the constructor returns only once
the worker is SERVING: a worker that cannot load its model fails the actor's creation, which
Ray does not retry (no restart loop over a bad model path).

The actors belong to this launcher's Ray job: Ctrl-C drains and removes them, and they go too
when the launcher dies. Tensor-parallel groups (placement groups) are not supported yet: one
worker holds at most one GPU.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from baton.deploy.launcher import Cluster, MetricsTarget, UpConfig
from baton.deploy.placement import MULTICAST_OFF, ray_transfer
from baton.router.ray_discovery import connect_ray
from baton.services.common.server import ServerConfig, ServiceServer
from baton.services.engine.config import EngineConfig
from baton.services.engine.engine_setup import resolve_model_path
from baton.services.worker.worker_config import WorkerConfig


@dataclass(frozen=True)
class RayConfig:
    """How `baton up --ray` places its workers on the Ray cluster."""

    ray_namespace: str = "baton"
    """Ray namespace of the worker actors (one `baton up --ray` per namespace and prefix)."""
    ray_actor_prefix: str = "baton"
    """Worker actors are named PREFIX-prefill-N, PREFIX-decode-N and PREFIX-encoder-N."""
    ray_gpus_per_worker: Optional[float] = None
    """GPUs each worker actor holds (a fraction shares one GPU; at most 1); default: 1 when the cluster has GPUs and --device is not cpu, else 0."""
    ray_cpus_per_worker: float = 1.0
    """CPUs each worker actor reserves on its node."""
    ray_max_restarts: int = -1
    """Times Ray restarts a worker actor that died (-1: always; 0: never)."""
    ray_node_ip: str = ""
    """This machine's address in the Ray cluster (127.0.0.1 for a loopback cluster); empty: Ray's guess."""
    ray_discovery_interval_s: float = 1.0
    """Seconds between the router's look-ups of the worker actors."""

    def __post_init__(self) -> None:
        if not self.ray_namespace or not self.ray_actor_prefix:
            raise ValueError("ray_namespace and ray_actor_prefix must be non-empty")
        if self.ray_gpus_per_worker is not None and not 0 <= self.ray_gpus_per_worker <= 1:
            raise ValueError("ray_gpus_per_worker must be in [0, 1] (tensor-parallel groups are not supported yet)")
        if self.ray_cpus_per_worker < 0 or self.ray_max_restarts < -1 or self.ray_discovery_interval_s <= 0:
            raise ValueError("need ray_cpus_per_worker >= 0, ray_max_restarts >= -1, ray_discovery_interval_s > 0")


class WorkerActor:
    """One prefill, decode or encoder worker, run inside its Ray actor's process (see the module doc)."""

    def __init__(self, name: str, role: str, engine: EngineConfig, worker: WorkerConfig, server: ServerConfig,
                 ready_timeout_s: float) -> None:
        import ray
        from baton.deploy.cli import worker_service
        self.name, self.role = name, role
        host = ray.util.get_node_ip_address()
        os.environ.update(MULTICAST_OFF)
        if host.startswith("127."):
            os.environ.setdefault("UCX_NET_DEVICES", "lo")
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
        self._server: Optional[ServiceServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._serving = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=name, daemon=True,
            args=(None if role == "encoder" else worker_service(role), engine, replace(worker, transfer_host=host),
                  replace(server, host=host)))
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self._serving.wait(0.2):
            if not self._thread.is_alive():
                raise RuntimeError(f"{name}: the {role} worker stopped during start-up (its log says why)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: the {role} worker was not SERVING after {ready_timeout_s:.0f} s")

    def _run(self, service, engine: EngineConfig, worker: WorkerConfig, server: ServerConfig) -> None:
        if service is None:  # an encoder
            from baton.services.encoder.encoder_config import EncoderConfig
            from baton.services.encoder.servicer import serve_encoder
            main = serve_encoder(engine, server, EncoderConfig(), worker, signals=False, on_serving=self._on_serving)
        else:
            from baton.services.worker.worker_main import serve_worker
            main = serve_worker(service, engine, server, worker, signals=False, on_serving=self._on_serving)
        code = asyncio.run(main)
        if self._serving.is_set() and not self._stopping:
            print(f"{self.name}: the worker stopped by itself (code {code}); the actor goes too", flush=True)
            os._exit(code or 1)

    def _on_serving(self, server: ServiceServer) -> None:
        self._server, self._loop = server, asyncio.get_running_loop()
        self._serving.set()

    def address(self) -> str:
        """The worker's gRPC host:port while it takes work ("" once draining)."""
        return "" if self._stopping or self._server is None else self._server.address

    def info(self) -> dict[str, Any]:
        """Name, role, gRPC and metrics addresses, and process id."""
        server = self._server
        metrics = f"{server.config.host}:{server.metrics_port}" if server and server.metrics_port else ""
        return {"name": self.name, "role": self.role, "address": server.address if server else "",
                "metrics": metrics, "pid": os.getpid()}

    def drain(self) -> None:
        """Drain the worker (no new work, running requests finish within its drain timeout) and stop it."""
        self._stopping = True
        if self._server is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._server.drain(), self._loop).result()
        self._thread.join(10)


class RayCluster(Cluster):
    """The worker actors of one `baton up --ray` and the router process in front of them."""

    def __init__(self, up: UpConfig, engine: EngineConfig, ray_config: RayConfig = RayConfig()) -> None:
        super().__init__(up, engine)
        self.ray_config = ray_config
        self.actors: dict[str, Any] = {}
        """Actor handles by name (PREFIX-ROLE-N)."""
        self._connected = False
        self._pending: dict[Any, str] = {}
        """`info()` calls in flight, by actor name (see `tick`)."""
        self._next_check = 0.0

    def worker_options(self, gpus_in_cluster: float) -> tuple[float, EngineConfig]:
        """GPUs per worker actor and the engine config every worker gets."""
        cfg, engine = self.ray_config, replace(self.engine, num_threads=self.up.worker_threads)
        gpus = cfg.ray_gpus_per_worker
        if gpus is None:
            gpus = 1.0 if gpus_in_cluster > 0 and engine.device != "cpu" else 0.0
        if gpus == 0:
            return 0.0, engine if engine.device != "auto" else replace(engine, device="cpu")
        return gpus, replace(engine, device="cuda", mem_fraction_static=round(engine.mem_fraction_static * gpus, 4))

    def start(self) -> str:
        """Create the worker actors, wait until each is SERVING, start the router; returns its URL."""
        cfg, up = self.ray_config, self.up
        self._connected = connect_ray(up.ray, cfg.ray_namespace, cfg.ray_node_ip, log_to_driver=True)
        import ray  # after connect_ray: it sets what Ray reads at import
        deadline = time.monotonic() + up.startup_timeout_s
        model = str(resolve_model_path(self.engine))  # the router's tokenizer; workers resolve theirs
        gpus, engine = self.worker_options(ray.cluster_resources().get("GPU", 0))
        worker = WorkerConfig(transfer=ray_transfer(up.transfer, gpus > 0))
        server = ServerConfig(port=0, metrics_port=0)
        remote = ray.remote(WorkerActor)
        for role, count in (("prefill", up.prefills), ("decode", up.decodes), ("encoder", up.encoders)):
            for i in range(count):
                name = f"{cfg.ray_actor_prefix}-{role}-{i}"
                self._refuse_taken(name)
                self.actors[name] = remote.options(
                    name=name, namespace=cfg.ray_namespace, num_cpus=cfg.ray_cpus_per_worker, num_gpus=gpus,
                    max_restarts=cfg.ray_max_restarts, max_task_retries=-1,
                ).remote(name, role, engine, worker, server, up.startup_timeout_s)
        for name, actor in self.actors.items():
            info = self._wait_actor(name, actor, deadline)
            self.metrics_targets.append(MetricsTarget(name, info["role"], info["metrics"], info["address"]))
            print(f"baton up: {name} serving on {info['address']} (pid {info['pid']})", flush=True)
        return self._start_router(model, ray.get_runtime_context().gcs_address, deadline)

    def _refuse_taken(self, name: str) -> None:
        import ray
        try:
            ray.get_actor(name, namespace=self.ray_config.ray_namespace)
        except ValueError:
            return
        raise RuntimeError(f"Ray actor {name} already exists in namespace {self.ray_config.ray_namespace}: "
                           f"another `baton up --ray` runs there (pick --ray-namespace or --ray-actor-prefix)")

    def _wait_actor(self, name: str, actor: Any, deadline: float) -> dict[str, Any]:
        """The actor's `info()` once its worker is SERVING (its constructor returned)."""
        import ray
        from ray.exceptions import RayError
        ref = actor.info.remote()
        while not ray.wait([ref], timeout=0.5)[0]:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not SERVING in time (is there room for it on the cluster?)")
        try:
            return ray.get(ref)
        except RayError as error:
            raise RuntimeError(f"{name} failed to start: {error}") from None

    def tick(self) -> None:
        """Follow restarted actors: every 2 s ask each for its `info()`; a new address is printed
        and the Prometheus targets are rewritten (a restarted worker has new ports)."""
        import ray
        from ray.exceptions import RayError
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + 2.0
            for name, actor in self.actors.items():
                if name not in self._pending.values():
                    self._pending[actor.info.remote()] = name
        if not self._pending:
            return
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        for ref in ready:
            name = self._pending.pop(ref)
            try:
                info = ray.get(ref)
            except RayError as error:  # restarts used up: Ray gave the actor up
                print(f"baton up: {name} is gone: {type(error).__name__}", flush=True)
                self.actors.pop(name, None)
                continue
            i = next(i for i, t in enumerate(self.metrics_targets) if t.name == name)
            if self.metrics_targets[i].worker != info["address"]:
                self.metrics_targets[i] = MetricsTarget(name, info["role"], info["metrics"], info["address"])
                print(f"baton up: {name} restarted; serving on {info['address']} (pid {info['pid']})", flush=True)
                self.write_targets()

    def _start_router(self, model: str, gcs_address: str, deadline: float) -> str:
        cfg, up = self.ray_config, self.up
        from baton.services.common.server import free_port
        http_port = up.port or free_port(up.host)
        ray_address = up.ray if up.ray.startswith("ray://") else gcs_address
        self._spawn("router", ["router", "--model", model, "--host", up.host, "--http-port", str(http_port),
                               "--grpc-port", str(up.grpc_port), *self._key_flags(),
                               "--decode-only-threshold", str(up.decode_only_threshold),
                               "--chat-template", up.chat_template, "--tool-call-parser", up.tool_call_parser,
                               "--max-queued-requests", str(up.router_max_queued_requests),
                               "--ray-address", ray_address, "--ray-namespace", cfg.ray_namespace,
                               "--ray-actor-prefix", cfg.ray_actor_prefix, "--ray-node-ip", cfg.ray_node_ip,
                               "--discovery-interval-s", str(cfg.ray_discovery_interval_s),
                               *(["--discover-encoders", f"{cfg.ray_actor_prefix}-encoder:0"] if up.encoders else []),
                               "--allowed-local-media-path", up.allowed_local_media_path,
                               *self._router_processes(http_port)],
                    {"CUDA_VISIBLE_DEVICES": ""})
        self.gateway_url = f"http://{up.host}:{http_port}"
        self._wait_http(self.gateway_url + "/health", deadline)
        return self.gateway_url

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the router, drain every worker actor (up to `grace_s`), then remove the actors."""
        super().stop(grace_s)
        if self.actors:
            import ray
            drains = [actor.drain.remote() for actor in self.actors.values()]
            ray.wait(drains, num_returns=len(drains), timeout=grace_s)
            for actor in self.actors.values():
                ray.kill(actor, no_restart=True)
            self.actors.clear()
        if self._connected:
            import ray
            ray.shutdown()  # this driver leaves; the cluster itself runs on
            self._connected = False

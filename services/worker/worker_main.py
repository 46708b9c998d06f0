"""The main of a worker process (`baton serve prefill|decode`), for whichever service it is given.

Owns `WorkerService` (what a role hands the shell: its wire role, a servicer factory and the
generated `add_*_to_server` function; the CLI picks it, this module imports no role package)
and the start-up order: the gRPC server starts first and answers health NOT_SERVING (so
probes see a live process), the model loads, the engine thread and transfer engine start,
then health turns SERVING and the address is printed. SIGTERM drains: new work is refused,
running requests finish (bounded by --drain-timeout-s), then the process exits. A host that
runs the worker off the main thread (a Ray actor, deploy/ray_launcher.py) passes
`signals=False` and drains through the `ServiceServer` that `on_serving` hands it.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.services.common.server import ServerConfig, ServiceServer
from baton.services.worker.kv_events import KVEventPublisher, KVEventsServicer, attach_to_engine
from baton.services.worker.worker_config import WorkerConfig
from baton.services.worker.worker_runtime import WorkerRuntime
from baton.services.engine.config import EngineConfig

log = logging.getLogger(__name__)


class WorkerServicer(Protocol):
    """What the shell needs of a servicer beyond its RPCs."""

    async def close(self) -> None:
        """Release what the servicer holds (channels to peers), after the server stopped."""


@dataclass(frozen=True)
class WorkerService:
    """One role's gRPC service, as the worker shell runs it."""

    role: int
    """The `baton.v1.WorkerRole` it serves (PREFILL or DECODE)."""
    make_servicer: Callable[[WorkerRuntime], WorkerServicer]
    """Builds the servicer over the worker's runtime."""
    add_to_server: Callable[[Any, Any], None]
    """The generated `worker_pb2_grpc.add_*Servicer_to_server`."""

    @property
    def name(self) -> str:
        """"prefill" or "decode"."""
        return worker_pb2.WorkerRole.Name(self.role).lower()


async def watch_engine(runtime: WorkerRuntime, server: ServiceServer, limit_s: float) -> None:
    """Health follows the engine: NOT_SERVING while one step or command has run past `limit_s`
    (a wedged engine thread), SERVING again once it moves (a busy engine is still serving)."""
    wedged = False
    while True:
        await asyncio.sleep(min(1.0, limit_s / 4))
        stuck = runtime.thread.stuck_for(time.monotonic())
        if (stuck >= limit_s) != wedged:
            wedged = not wedged
            if wedged:
                log.error("engine stuck in one step for %.1f s: health NOT_SERVING", stuck)
            else:
                log.warning("engine moving again: health SERVING")
            await server.set_serving(not wedged)


async def serve_worker(service: WorkerService, engine_config: EngineConfig, server_config: ServerConfig,
                       worker_config: WorkerConfig, *, signals: bool = True,
                       on_serving: Optional[Callable[[ServiceServer], None]] = None) -> int:
    """Run one worker until it is drained; returns the exit code. `signals`: SIGTERM / SIGINT
    drain it (main thread only); `on_serving` is called with the server once health is SERVING."""
    role = service.name
    if worker_config.gil_switch_interval_s > 0:  # the gRPC loop waits at most this long for the engine thread's GIL
        sys.setswitchinterval(worker_config.gil_switch_interval_s)
    runtime = WorkerRuntime(service.role, engine_config, worker_config)
    servicer = service.make_servicer(runtime)
    server = ServiceServer(server_config, registry=runtime.metrics.registry,
                           on_drain=lambda: runtime.drain(server_config.drain_timeout_s))
    server.add_servicer(service.add_to_server, servicer)
    if hasattr(servicer, "decode_streams"):  # a decode worker: its multiplexed streams end when the server stops
        server.add_stop_hook(servicer.decode_streams.close)
    kv_events = KVEventPublisher(engine_config.page_size, asyncio.get_running_loop())
    server.add_servicer(worker_pb2_grpc.add_KVEventsServicer_to_server, KVEventsServicer(kv_events))
    server.add_stop_hook(kv_events.close)
    runtime.credentials, runtime.server_host = server.credentials, server_config.host  # peers' channels, KV port
    await server.start()
    runtime.metrics_port = server.metrics_port or 0  # Info lists it (the router's /workers shows it)
    if signals:
        server.install_signal_handlers()
    try:
        await runtime.load(server.address)
    except Exception as error:
        print(f"baton {role}: failed to load the model: {error}", file=sys.stderr, flush=True)
        await server.stop(0)
        return 1
    kv_events.worker_id, kv_events.epoch = runtime.worker_id, runtime.transfer.epoch
    attach_to_engine(runtime.thread.engine, kv_events)  # the router's precise cache-aware routing
    await server.set_serving(True)
    watchdog = asyncio.create_task(watch_engine(runtime, server, worker_config.engine_stall_timeout_s))
    print(f"baton {role} worker serving on {server.address} (metrics :{server.metrics_port}, "
          f"transfer {worker_config.transfer})", flush=True)
    if on_serving is not None:
        on_serving(server)
    await server.wait_for_termination()
    watchdog.cancel()
    await servicer.close()
    runtime.close()
    return 0


def run_worker(service: WorkerService, engine_config: EngineConfig, server_config: ServerConfig,
               worker_config: WorkerConfig) -> int:
    """Blocking entry point used by the CLI."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {service.name} %(levelname)s %(message)s")
    return asyncio.run(serve_worker(service, engine_config, server_config, worker_config))

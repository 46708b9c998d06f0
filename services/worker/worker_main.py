"""The main of a prefill or decode worker process (`baton serve prefill|decode`).

Start-up order: the gRPC server starts first and answers health NOT_SERVING (so probes see
a live process), the model loads, the engine thread and transfer engine start, then health
turns SERVING and the address is printed. SIGTERM drains: new work is refused, running
requests finish (bounded by --drain-timeout-s), then the process exits.
"""
from __future__ import annotations

import asyncio
import logging
import sys

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.services.common.server import ServerConfig, ServiceServer
from baton.services.worker.worker_config import WorkerConfig
from baton.services.worker.worker_runtime import WorkerRuntime
from baton.services.engine.config import EngineConfig

log = logging.getLogger(__name__)


def build_servicer(role: str, runtime: WorkerRuntime):
    """The servicer object and its generated `add_*_to_server` function for a role."""
    if role == "prefill":
        from baton.services.prefill.servicer import PrefillServicer
        return PrefillServicer(runtime), worker_pb2_grpc.add_PrefillServicer_to_server
    from baton.services.decode.servicer import DecodeServicer
    return DecodeServicer(runtime), worker_pb2_grpc.add_DecodeServicer_to_server


async def serve_worker(role: str, engine_config: EngineConfig, server_config: ServerConfig,
                       worker_config: WorkerConfig) -> int:
    """Run one worker until it is drained; returns the exit code."""
    runtime = WorkerRuntime(worker_pb2.PREFILL if role == "prefill" else worker_pb2.DECODE, engine_config,
                            worker_config)
    servicer, adder = build_servicer(role, runtime)
    server = ServiceServer(server_config, registry=runtime.metrics.registry,
                           on_drain=lambda: runtime.drain(server_config.drain_timeout_s))
    server.add_servicer(adder, servicer)
    await server.start()
    server.install_signal_handlers()
    try:
        await runtime.load(server.address)
    except Exception as error:
        print(f"baton {role}: failed to load the model: {error}", file=sys.stderr, flush=True)
        await server.stop(0)
        return 1
    await server.set_serving(True)
    print(f"baton {role} worker serving on {server.address} (metrics :{server.metrics_port}, "
          f"transfer {worker_config.transfer})", flush=True)
    await server.wait_for_termination()
    if hasattr(servicer, "close"):
        await servicer.close()
    runtime.close()
    return 0


def run_worker(role: str, engine_config: EngineConfig, server_config: ServerConfig,
               worker_config: WorkerConfig) -> int:
    """Blocking entry point used by the CLI."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    return asyncio.run(serve_worker(role, engine_config, server_config, worker_config))

"""The router process (`baton router`): the baton.v1.Router gRPC service and the
OpenAI-compatible HTTP gateway over one `RouterCore`, until SIGTERM / SIGINT."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.protos.baton.v1 import router_pb2, router_pb2_grpc
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.discovery import discovery_from_config
from baton.router.grpc_service import RouterServicer

log = logging.getLogger(__name__)


def load_tokenizer_and_context(model: str):
    """The model folder's tokenizer and its context length (config.json max_position_embeddings)."""
    from transformers import AutoTokenizer
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: not a model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    return tokenizer, int(config.get("max_position_embeddings", 4096))


ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
"""`baton.v1.Router`: the name its gRPC health is registered under (as well as "")."""


async def keep_health_honest(core: RouterCore, servicer: health.aio.HealthServicer) -> None:
    """gRPC health follows HTTP /health: SERVING exactly while a decode worker can serve."""
    serving, ok = None, health_pb2.HealthCheckResponse
    while True:
        try:
            now = core.is_serving()
            if now != serving:
                status = ok.SERVING if now else ok.NOT_SERVING
                for name in ("", ROUTER_SERVICE):
                    await servicer.set(name, status)
                serving = now
                log.info("router gRPC health: %s", "SERVING" if now else "NOT_SERVING")
        except Exception:  # never let the health task die silently
            log.exception("updating the router's gRPC health failed")
            serving = None
        await asyncio.sleep(min(0.5, core.config.health_interval_s))


async def start_grpc(core: RouterCore, host: str, port: int) -> tuple[grpc.aio.Server, int, asyncio.Task]:
    """The Router gRPC service with standard health and reflection; returns (server, port, the
    task that keeps its health status current). A process of `--processes` shares `port` with the
    others and also listens on its own gRPC port (`RouterConfig.own_ports`); otherwise the port is
    never shared (a second router on it fails)."""
    config = core.config
    own = config.own_ports
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", config.max_request_bytes),
                                      ("grpc.so_reuseport", int(own is not None))])
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [ROUTER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if own is not None:
        server.add_insecure_port(f"{host}:{own[1]}")
    await server.start()
    return server, bound, asyncio.create_task(keep_health_honest(core, health_servicer))


async def serve_router(config: RouterConfig) -> int:
    """Run the router until a signal; returns the exit code."""
    from baton.router.gateway.server import serve_gateway
    tokenizer, context = await asyncio.to_thread(load_tokenizer_and_context, config.model)
    if config.chat_template:
        tokenizer.chat_template = Path(config.chat_template).read_text()
    from baton.router.gateway.template_guard import guard_request_templates
    tokenizer = guard_request_templates(tokenizer, config.trust_request_chat_template)
    core = RouterCore(config, tokenizer)
    core.max_model_len = context
    await core.start()
    discovery = discovery_from_config(config, core.registry, core.metrics.forget_worker)
    if discovery is not None:
        discovery.start()
    grpc_server, grpc_port, health_task = await start_grpc(core, config.host, config.grpc_port)
    own = config.own_ports
    gateway, http_port = await serve_gateway(core, config.host, config.http_port, own_port=own[0] if own else 0)
    own_text = f"; own ports http {own[0]}, gRPC {own[1]}" if own else ""
    print(f"baton router: gateway http://{config.host}:{http_port}/v1 (model {core.model_name}), "
          f"gRPC {config.host}:{grpc_port}{own_text}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    health_task.cancel()
    if discovery is not None:
        await discovery.stop()
    await gateway.stop()
    await grpc_server.stop(5)
    await core.stop()
    return 0


def run_router(config: RouterConfig) -> int:
    """Blocking entry point used by the CLI (`--processes` > 1: router/processes.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    if config.processes > 1:
        from baton.router.processes import run_router_processes
        return run_router_processes(config)
    return asyncio.run(serve_router(config))

"""gRPC server scaffolding for one service process (encoder, prefill, decode; the router too).

`ServiceServer` owns everything around the servicers: the `grpc.aio` server and its port,
the standard health service (overall "" and one entry per service, NOT_SERVING until the
service calls `set_serving(True)`), server reflection, a Prometheus `/metrics` endpoint on
its own port serving the service's own `CollectorRegistry`, and graceful drain. With a
cluster secret (`--cluster-secret-file`) every call but health needs the cluster token, and
with the TLS flags the port speaks TLS (mTLS with a CA): `baton.protos.cluster_auth`.

Life of a service process:

    server = ServiceServer(ServerConfig(port=0), registry=registry, on_drain=service.drain)
    server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, servicer)
    port = await server.start()            # bound; health NOT_SERVING
    ...load the model...
    await server.set_serving(True)         # health SERVING: the router may send work
    server.install_signal_handlers()
    await server.wait_for_termination()    # returns after drain() (or stop()) completes

Drain (SIGTERM / SIGINT, or `await server.drain()`): health goes NOT_SERVING for good,
`server.draining` becomes True (servicers refuse new work with BatonError(DRAINING), see
`ensure_accepting`), the service's `on_drain` coroutine finishes or hands back its running
requests, then the gRPC server stops with what is left of `drain_timeout_s` as its grace
period. A second signal during drain stops at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from baton.protos.cluster_auth import OPEN, ClusterCredentials, add_port, open_channel, server_interceptors
from baton.protos.errors import BatonError, ErrorCode
from baton.protos.ports import free_port, free_ports  # noqa: F401 - re-exported for the launchers and tests

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerConfig:
    """Where and how one service process serves gRPC and metrics."""

    host: str = "127.0.0.1"
    """Address the gRPC server and the metrics endpoint bind (0.0.0.0 in a container)."""
    port: int = 0
    """gRPC port; 0 picks a free port (read it back from `ServiceServer.port`)."""
    metrics_port: int = 0
    """Prometheus /metrics HTTP port; 0 picks a free port, -1 serves no metrics endpoint."""
    drain_timeout_s: float = 30.0
    """On SIGTERM / SIGINT, most seconds to finish or hand back running requests before stopping."""
    max_message_mb: int = 64
    """Largest gRPC message this server sends or receives, in MiB."""
    cluster_secret_file: str = ""
    """File holding the cluster secret: every call but health needs its token, and this process's own calls carry it (empty: open)."""
    tls_cert_file: str = ""
    """PEM certificate this process presents on its gRPC port and to peers (with --tls-key-file; empty: plaintext)."""
    tls_key_file: str = ""
    """PEM private key of --tls-cert-file."""
    tls_ca_file: str = ""
    """PEM CA bundle peers' certificates must chain to; on the server it also requires client certificates (mTLS)."""

    def __post_init__(self) -> None:
        checks = [
            (bool(self.host), "host must be non-empty"),
            (0 <= self.port <= 65535, "port must be in [0, 65535]"),
            (-1 <= self.metrics_port <= 65535, "metrics_port must be -1 (off) or in [0, 65535]"),
            (self.drain_timeout_s >= 0, "drain_timeout_s must be non-negative"),
            (self.max_message_mb >= 1, "max_message_mb must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class _NameRecorder:
    """Stands in for a server when calling a generated `add_*Servicer_to_server` to learn
    which service names it registers."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if callable(name) and name():
                self.names.append(name())

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        self.names.append(service_name)


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServiceServer:
    """One process's gRPC server with health, reflection, metrics and graceful drain.

    Build it anywhere; `start()` creates the `grpc.aio` server on the running loop.
    Servicers are added before `start()`."""

    def __init__(self, config: ServerConfig = ServerConfig(), registry: Optional[CollectorRegistry] = None,
                 on_drain: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        self.config = config
        self.credentials = credentials_from_config(config)
        """The cluster secret and TLS files `config` names (calls are checked against them)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.on_drain = on_drain
        self.draining = False
        self._stop_hooks: list[Callable[[], None]] = []
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.service_names: list[str] = []
        self._servicers: list[tuple[Callable[[Any, Any], None], Any]] = []
        self._health = health.aio.HealthServicer()
        self._serving = False
        self._server: Optional[grpc.aio.Server] = None
        self._metrics_httpd: Any = None
        self._stopping = False
        self._hurry = asyncio.Event()
        self._terminated = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        """host:port of the started server."""
        if self.port is None:
            raise RuntimeError("server not started")
        return _bind_address(self.config.host, self.port)

    @property
    def grpc_server(self) -> grpc.aio.Server:
        """The underlying `grpc.aio.Server` (after `start()`)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server

    def add_servicer(self, adder: Callable[[Any, Any], None], servicer: Any) -> list[str]:
        """Register `servicer` with a generated `add_XServicer_to_server` function; returns the
        full service names it serves (they get health entries and reflection)."""
        if self._server is not None:
            raise RuntimeError("add servicers before start()")
        recorder = _NameRecorder()
        adder(servicer, recorder)
        names = list(dict.fromkeys(recorder.names))
        if not names:
            raise ValueError(f"{adder!r} registered no service")
        self._servicers.append((adder, servicer))
        self.service_names.extend(n for n in names if n not in self.service_names)
        return names

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING (True) or NOT_SERVING on the overall and every per-service health
        entry. Ignored once draining."""
        self._serving = serving
        if self._server is not None:
            await self._publish_health()

    async def _publish_health(self) -> None:
        status = _SERVING if self._serving else _NOT_SERVING
        for name in ["", *self.service_names]:
            await self._health.set(name, status)

    def add_stop_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook` when the server starts stopping: it ends long-lived streams (KV-event
        subscriptions) that would otherwise keep the server waiting out its grace period."""
        self._stop_hooks.append(hook)

    def ensure_accepting(self) -> None:
        """Raise BatonError(DRAINING) when the server is draining (call at the top of an RPC
        that starts new work, then `abort_with` the error)."""
        if self.draining:
            raise BatonError(ErrorCode.DRAINING, "the worker is draining; retry elsewhere")

    async def start(self) -> int:
        """Bind and start the gRPC server (and the metrics endpoint); returns the gRPC port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        max_bytes = self.config.max_message_mb * 1024 * 1024
        server = grpc.aio.server(options=[("grpc.max_send_message_length", max_bytes),
                                          ("grpc.max_receive_message_length", max_bytes)],
                                 interceptors=server_interceptors(self.credentials))
        for adder, servicer in self._servicers:
            adder(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = add_port(server, _bind_address(self.config.host, self.config.port), self.credentials)
        if port == 0:
            raise RuntimeError(f"could not bind gRPC on {_bind_address(self.config.host, self.config.port)}")
        self._server = server
        await self._publish_health()
        await server.start()
        self.port = port
        if self.config.metrics_port >= 0:
            self._metrics_httpd, _ = start_http_server(self.config.metrics_port, addr=self.config.host,
                                                       registry=self.registry)
            self.metrics_port = self._metrics_httpd.server_port
        logger.info("serving %s on %s (metrics port %s)", ", ".join(self.service_names) or "nothing",
                    self.address, self.metrics_port)
        return port

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Make SIGTERM / SIGINT start `drain()`; a second signal stops at once.
        Call from the main thread, inside the running loop."""
        loop = asyncio.get_running_loop()
        for signum in signals:
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.draining:
            logger.info("%s: draining (up to %.1f s)", name, self.config.drain_timeout_s)
            self._spawn(self.drain())
            return
        logger.warning("%s during drain: stopping now", name)
        self._hurry.set()
        if self._stopping and self._server is not None:
            self._spawn(self._server.stop(None))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Stop taking work and shut down within `drain_timeout_s`: health NOT_SERVING,
        `draining = True`, `on_drain()`, then stop the server with the time left as grace.
        Idempotent; returns once the server has stopped."""
        if self.draining:
            await self._terminated.wait()
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        await self._health.enter_graceful_shutdown()
        if self.on_drain is not None:
            await self._run_on_drain(deadline - loop.time())
        grace = 0.0 if self._hurry.is_set() else max(0.0, deadline - loop.time())
        await self.stop(grace)

    async def _run_on_drain(self, timeout: float) -> None:
        assert self.on_drain is not None
        work = asyncio.ensure_future(self.on_drain())
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            done, _ = await asyncio.wait({work, hurry}, timeout=max(0.0, timeout),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        if work not in done:
            logger.warning("on_drain did not finish in time; stopping with requests still running")
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        elif work.exception() is not None:
            logger.error("on_drain failed", exc_info=work.exception())

    async def stop(self, grace: Optional[float] = None) -> None:
        """Stop the gRPC server (in-flight RPCs get `grace` seconds; None aborts them) and the
        metrics endpoint. Idempotent: a later call with a smaller grace stops sooner."""
        self._stopping = True
        for hook in self._stop_hooks:
            hook()
        self._stop_hooks.clear()
        if self._server is not None:
            await self._server.stop(grace)
        httpd, self._metrics_httpd = self._metrics_httpd, None
        if httpd is not None:
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()
        self._terminated.set()

    async def wait_for_termination(self) -> None:
        """Return once the server has stopped (after `drain()` or `stop()`)."""
        await self._terminated.wait()

    async def serve(self) -> None:
        """start() + install_signal_handlers() + wait_for_termination(), for a service's main."""
        if self._server is None:
            await self.start()
        self.install_signal_handlers()
        await self.wait_for_termination()


def credentials_from_config(config: ServerConfig) -> ClusterCredentials:
    """The cluster credentials a server config's files hold."""
    return ClusterCredentials.from_files(config.cluster_secret_file, config.tls_cert_file, config.tls_key_file,
                                         config.tls_ca_file)


async def wait_for_health(address: str, timeout: float, service: str = "",
                          credentials: ClusterCredentials = OPEN) -> None:
    """Poll grpc.health.v1 Check on `address` until `service` is SERVING; TimeoutError (with
    the last status seen) when it is not within `timeout` seconds. `credentials`: the TLS
    files of a TLS server (health needs no cluster token)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 500)]
    async with open_channel(address, credentials, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        delay = 0.02
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{address} {service or '(overall)'} not SERVING after {timeout:.1f} s "
                                   f"(last status: {last})")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 1.0))
                if reply.status == _SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.2)


"""Running the gateway app with uvicorn inside an already running asyncio loop.

`serve_gateway(core, host, port)` binds the socket itself (port 0 picks a free one; a port in
use raises `OSError` at once instead of uvicorn's `sys.exit`), starts uvicorn as a task of the
running loop without touching signal handlers (the caller owns them), waits until it accepts
connections and returns `(server, port)`: the `GatewayServer` (a `uvicorn.Server`, also
holding `.port` and `.task`) and the bound port. Stop it with `server.should_exit = True`
(then await `server.task`), or `await server.stop()`.

HTTP/1.1 is parsed by `httptools` (C, a dependency) when it imports, else by uvicorn's
pure-Python h11: `http_protocol()` says which. uvicorn's own event loop choice is not used
(the running asyncio loop, which grpc.aio shares, serves both; no uvloop).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Generator, Optional

import uvicorn

from baton.router.gateway.app import create_app


class GatewayServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner."""

    host: str = ""
    port: int = 0
    task: Optional[asyncio.Task] = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to exit and wait for it (forcing it after `timeout_s`)."""
        self.should_exit = True
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
        except asyncio.TimeoutError:
            self.force_exit = True
            await self.task


def http_protocol() -> str:
    """uvicorn's HTTP implementation here: "httptools" when it imports, else "h11"."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # the processes of `baton router --processes` share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve_gateway(core, host: str = "127.0.0.1", port: int = 0, *,
                        log_level: str = "warning", access_log: bool = False,
                        graceful_shutdown_s: float = 5.0, own_port: int = 0) -> tuple[GatewayServer, int]:
    """Start the HTTP gateway for `core` on `host:port` in the running loop; returns
    `(server, bound port)` once it is accepting connections. `own_port` > 0 (a process of `baton router
    --processes`): `port` is shared with the other processes (SO_REUSEPORT), and the same app also
    listens on `own_port`, this process's alone."""
    sock = _bind(host, port, reuse_port=own_port > 0)
    sockets = [sock] + ([_bind(host, own_port)] if own_port else [])
    config = uvicorn.Config(
        create_app(core), log_level=log_level, access_log=access_log, lifespan="off",
        timeout_graceful_shutdown=graceful_shutdown_s, ws="none", http=http_protocol())
    server = GatewayServer(config)
    server.host, server.port = host, sock.getsockname()[1]
    server.task = asyncio.create_task(server.serve(sockets=sockets), name=f"gateway-{server.port}")
    server.task.add_done_callback(lambda _: [s.close() for s in sockets])
    while not server.started:
        if server.task.done():
            server.task.result()  # raises what stopped it
            raise RuntimeError("the gateway server exited during startup")
        await asyncio.sleep(0.01)
    return server, server.port

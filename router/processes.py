"""`baton router --processes N`: N router processes on one HTTP and one gRPC port.

The parent binds nothing and serves nothing. It fixes the shared ports (picking free ones for any
left at 0), gives each process its own HTTP and gRPC port as well (`--process-ports`, or picked),
starts the processes and watches them. Each child is a whole router (`serve_router`) that binds
the shared ports with SO_REUSEPORT, so the kernel spreads new connections over them, and counts
the others as router replicas (`--router-peers`, their own gRPC ports): cluster-wide limits such as
the router queue are shared among the live ones as for replicas on several machines
(router/replicas.py). A child's own HTTP port serves the same app as the shared one; Prometheus
scrapes each child there (the shared port answers from whichever child the connection reached).

SIGTERM / SIGINT go to every child, and the parent waits for their drains. A child that exits
on its own takes the others down with it and the parent exits 1: the process supervisor (`baton
up`, Kubernetes) restarts the router whole, so no port is left half served.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from typing import Optional

from baton.protos.ports import free_ports
from baton.router.config import RouterConfig

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
"""How long stopped children may drain before they are killed."""


def child_configs(config: RouterConfig) -> list[RouterConfig]:
    """One config per process: the shared ports fixed, its own ports, and the others as its peers."""
    count = config.processes
    pairs = config.port_pairs()
    picked = free_ports(2 * count + 2, config.host)
    if not pairs:
        pairs = [(picked[2 * i], picked[2 * i + 1]) for i in range(count)]
    http_port, grpc_port = config.http_port or picked[-2], config.grpc_port or picked[-1]
    children = []
    for i, (own_http, own_grpc) in enumerate(pairs):
        peers = [f"{config.host}:{g}" for j, (_, g) in enumerate(pairs) if j != i]
        peers = RouterConfig.addresses(config.router_peers) + peers
        children.append(dataclasses.replace(config, processes=1, process_ports=f"{own_http}:{own_grpc}",
                                            http_port=http_port, grpc_port=grpc_port, router_peers=",".join(peers)))
    return children


def _child_main(fields: dict, parent: int) -> None:
    """A child process: one whole router (its config rebuilt from plain fields: the parent's holds
    open credentials that do not pickle). It gets SIGTERM when the parent dies, even by SIGKILL, so
    no orphan keeps serving the shared ports (Linux; elsewhere the parent's own stop must do)."""
    import sys

    from baton.router.main import run_router
    _term_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(1)
    sys.exit(run_router(RouterConfig(**fields)))


def _term_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGTERM) where libc offers it."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("cannot ask for SIGTERM on the parent's death here: a killed parent leaves this process running")


def run_router_processes(config: RouterConfig) -> int:
    """Start and watch the processes until a signal (exit 0 once they drained) or a child's own exit (1)."""
    children = child_configs(config)
    context = multiprocessing.get_context("spawn")  # no forked grpc / asyncio state
    procs = []
    for i, child in enumerate(children):
        fields = {f.name: getattr(child, f.name) for f in dataclasses.fields(child)}
        proc = context.Process(target=_child_main, args=(fields, os.getpid()), name=f"router-{i}", daemon=False)
        proc.start()
        procs.append(proc)
        log.info("router process %d (pid %d): own ports http:grpc %s", i, proc.pid, child.process_ports)
    print(f"baton router: {len(procs)} processes on http://{config.host}:{children[0].http_port}/v1 and gRPC "
          f"{config.host}:{children[0].grpc_port}; own ports "
          + ", ".join(c.process_ports for c in children), flush=True)
    stopping: Optional[int] = None

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while stopping is None and all(p.is_alive() for p in procs):
            time.sleep(0.1)
        if stopping is None:
            dead = [p for p in procs if not p.is_alive()]
            log.error("router process %s exited (code %s): stopping the others", dead[0].name, dead[0].exitcode)
        _stop(procs, stopping or signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping is not None else 1


def _stop(procs: list, signum: int) -> None:
    """Signal every live child, wait for their drains together, kill what outlives the grace."""
    for proc in procs:
        if proc.is_alive():
            try:
                os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)

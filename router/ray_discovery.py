"""Worker discovery on Ray: the router follows the prefill and decode workers that run as Ray
actors (`baton up --ray`, deploy/ray_launcher.py) instead of a static list or DNS names.

The contract with the launcher is small and lives on the wire of Ray itself: every worker is a
named actor `PREFIX-ROLE-N` (e.g. `baton-decode-0`) in one Ray namespace, and its `address()`
method answers the worker's gRPC host:port once the worker is SERVING. `RayWorkerResolver` is a
`router.discovery.Resolver` for `WorkerDiscovery`: its "host" is the name prefix of one role
(`baton-decode`) and the answer is the address of every such actor that answers within
`timeout_s`. So the router's discovery rules hold unchanged on Ray:
- an actor that appears (or comes back from a restart with a new port and epoch) is added and
  gets work once it passes a health check;
- an actor that died, is being restarted by Ray or is draining stops answering: its address is
  dropped once the router's streams on it have ended (they fail over meanwhile);
- Ray itself unreachable (GCS down) changes nothing.
The router process joins the cluster as a Ray driver (`connect_ray`); `ray` is imported only
here and only when `--ray-address` is given.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

from baton.router.discovery import NameNotFound

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost")
"""Addresses that mean a loopback cluster: Ray must then keep 127.0.0.1 (it reads the switch at import)."""


def connect_ray(address: str, namespace: str, node_ip: str = "", log_to_driver: bool = False) -> bool:
    """Join the Ray cluster at `address` (GCS host:port, auto, or ray://host:port) as a driver;
    `node_ip` is this machine's address in the cluster (127.0.0.1 for a loopback cluster), and the
    actors' log lines are printed here only with `log_to_driver`. Keeps the process's SIGTERM /
    SIGINT handlers (ray.init replaces them). False when this process was connected already."""
    if address.split(":")[0] in LOOPBACK or node_ip in LOOPBACK:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray swaps loopback for the host IP
    import ray
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": namespace, "log_to_driver": log_to_driver,
                              "logging_level": logging.WARNING}
    if node_ip and not address.startswith("ray://"):
        kwargs["_node_ip_address"] = node_ip
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        ray.init(address=address, **kwargs)
        ray.put(None)  # builds the serialization context here, not racing other imports in a resolver thread
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return True


class RayWorkerResolver:
    """(prefix, port) -> the gRPC addresses of the live actors named `prefix-N` in `namespace`."""

    def __init__(self, namespace: str, timeout_s: float = 2.0) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._handles: dict[str, Any] = {}

    async def __call__(self, prefix: str, port: int) -> list[str]:
        return await asyncio.to_thread(self.resolve, prefix)

    def actor_names(self, prefix: str) -> list[str]:
        """Names of the actors of one role in the namespace (alive or being restarted)."""
        import ray
        entries = ray.util.list_named_actors(all_namespaces=True)
        return sorted(e["name"] for e in entries
                      if e["namespace"] == self.namespace and e["name"].startswith(prefix + "-"))

    def resolve(self, prefix: str) -> list[str]:
        """Ask every actor of the role for its address; those that answer in time count."""
        import ray
        from ray.exceptions import RayError, RaySystemError
        try:
            names = self.actor_names(prefix)
        except (RaySystemError, RuntimeError) as error:
            raise ConnectionError(f"Ray: {error}") from None
        if not names:
            raise NameNotFound(prefix)
        calls = {}
        for name in names:
            try:
                handle = self._handles.get(name) or ray.get_actor(name, namespace=self.namespace)
            except ValueError:  # gone between the listing and now
                continue
            self._handles[name] = handle
            calls[name] = handle.address.remote()
        ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=self.timeout_s)
        done = set(ready)
        addresses = set()
        for name, ref in calls.items():
            if ref not in done:
                continue  # restarting, loading or draining: not a worker to send work to now
            try:
                address = ray.get(ref, timeout=0)
            except RayError as error:
                self._handles.pop(name, None)  # dead for good (or replaced): look it up afresh
                log.info("Ray actor %s is gone (%s)", name, type(error).__name__)
                continue
            if address:
                addresses.add(address)
        return sorted(addresses)

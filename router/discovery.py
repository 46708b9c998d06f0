"""Worker discovery through DNS: the router finds prefill and decode workers behind names that
resolve to every worker, such as a Kubernetes headless Service
(`baton-decode.NAMESPACE.svc.cluster.local`, one A record per ready pod).

Every `interval_s` each name is resolved again and the registry follows it:
- an address that appears is added (the health loop checks it before it gets work);
- an address that disappears is dropped (a pod gone, or restarted with a new IP), once no
  request the router sent it is still running there: a draining pod leaves the Service while it
  finishes its streams, and those streams must not be cut;
- a name that does not exist (NXDOMAIN: a headless Service with no ready pod) means no workers;
- any other look-up failure (a DNS timeout) changes nothing: a flaky resolver must not empty the
  cluster.
Only addresses discovery added are ever dropped; workers given as flags stay. The resolver is
a parameter (`Resolver`), so tests feed real worker addresses that change over time; on Ray the
names are actor-name prefixes and the resolver asks Ray for the live actors (router/ray_discovery.py).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from baton.router.registry import WorkerRegistry
from baton.router.types import Role

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the "ip:port" addresses behind the name; raises NameNotFound when it does not exist."""


class NameNotFound(LookupError):
    """The name does not exist (NXDOMAIN or no address records): no worker is behind it now."""


def format_address(ip: str, port: int) -> str:
    """ip:port, with IPv6 addresses in brackets (what gRPC dials)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve_dns(host: str, port: int) -> list[str]:
    """The system resolver's addresses for `host` (every A / AAAA record), sorted."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise NameNotFound(host) from None
        raise
    return sorted({format_address(info[4][0], port) for info in infos})


def split_target(target: str) -> tuple[str, int]:
    """'name:port' -> (name, port), with a clear error for anything else."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"discovery target {target!r}: give host:port, e.g. baton-decode.default.svc:50051")
    return host.strip("[]"), int(port)


@dataclass
class DiscoveredName:
    """One name to follow and the addresses discovery added for it."""

    host: str
    port: int
    role: Role
    added: set[str] = field(default_factory=set)


class WorkerDiscovery:
    """Keeps the registry's discovered workers equal to what their names resolve to."""

    def __init__(self, registry: WorkerRegistry, targets: list[tuple[str, Role]], interval_s: float,
                 resolver: Resolver = resolve_dns,
                 on_removed: Optional[Callable[[str, Role], None]] = None,
                 parse: Callable[[str], tuple[str, int]] = split_target) -> None:
        self.registry = registry
        self.names = [DiscoveredName(*parse(target), role) for target, role in targets]
        """What is followed; `parse` splits each target into the resolver's (host, port)."""
        self.interval_s = interval_s
        self.resolver = resolver
        self.on_removed = on_removed
        """Called with (address, role) after a worker is dropped (the router forgets its gauges)."""
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Resolve now and then every `interval_s`, in the background."""
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a resolver's unexpected error must not end discovery for good
                log.exception("worker discovery failed; trying again in %.1f s", self.interval_s)
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> None:
        """One look-up of every name, and the registry changed to match."""
        added_any = False
        for name in self.names:
            found = await self._lookup(name)
            if found is None:
                continue
            for address in sorted(found - name.added):
                if self.registry.add(address, name.role):
                    name.added.add(address)
                    added_any = True
                    log.info("discovered %s worker %s (%s)", name.role.value, address, name.host)
            for address in sorted(name.added - found):
                await self._drop(name, address)
        if added_any:
            await self.registry.check_all()  # new workers take work as soon as they pass a check

    async def _lookup(self, name: DiscoveredName) -> Optional[set[str]]:
        """The addresses behind the name; None when the look-up failed (keep what we have)."""
        try:
            return set(await self.resolver(name.host, name.port))
        except NameNotFound:
            return set()
        except OSError as error:
            log.warning("resolving %s failed (%s); keeping its %d workers", name.host, error, len(name.added))
            return None

    async def _drop(self, name: DiscoveredName, address: str) -> None:
        """Forget a worker that left its name, once none of our requests runs on it."""
        entry = self.registry.workers.get(address)
        if entry is not None and entry.in_flight > 0:
            return  # draining: dropped on a later look-up, when its streams have ended
        name.added.discard(address)
        if await self.registry.remove(address):
            log.info("%s worker %s left %s; dropped", name.role.value, address, name.host)
            if self.on_removed is not None:
                self.on_removed(address, name.role)


def discovery_from_config(config, registry: WorkerRegistry,
                          on_removed: Optional[Callable[[str, Role], None]] = None,
                          resolver: Optional[Resolver] = None) -> Optional[WorkerDiscovery]:
    """The discovery a RouterConfig asks for (`discover_prefill` / `discover_decode` names, or the
    Ray actors of `ray_address`, joining that Ray cluster), or None; `resolver` defaults to this
    module's `resolve_dns` (or the Ray resolver), looked up at call time."""
    if config.ray_address:
        from baton.router.ray_discovery import RayWorkerResolver, connect_ray
        if resolver is None:
            connect_ray(config.ray_address, config.ray_namespace, config.ray_node_ip)
        prefixes = [(f"{config.ray_actor_prefix}-{role.value}", role) for role in (Role.PREFILL, Role.DECODE)]
        return WorkerDiscovery(registry, prefixes, config.discovery_interval_s,
                               resolver or RayWorkerResolver(config.ray_namespace), on_removed,
                               parse=lambda prefix: (prefix, 0))
    targets = [(t, role) for t, role in ((config.discover_prefill, Role.PREFILL), (config.discover_decode, Role.DECODE))
               if t]
    if not targets:
        return None
    return WorkerDiscovery(registry, targets, config.discovery_interval_s, resolver or resolve_dns, on_removed)

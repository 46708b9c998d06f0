"""The encoders a router sends image requests to: their health and load, and each request's ranking.

Owns `EncoderPool`: the `--encoders` addresses, polled with `Encoder.Info` every
`health_interval_s` (an encoder that does not answer, or answers not ready / draining, is
unhealthy until it answers again), and `ranked`, the order in which a request's decode
(or prefill) worker tries them: healthy encoders only, by the policy: `min_load` (fewest
images in progress, as last reported) or `cache_affinity`
(rendezvous hashing on the request's first image hash, so the same image goes to the
encoder whose embedding cache holds it; the others follow as fallbacks); unhealthy encoders
come last. The worker retries
a failed encoder on the next one in the list; an empty ranking with encoders configured
is a clear NO_WORKER before anything is sent (`check_available`). A router without
encoders sends image requests with an empty list: workers then run the vision tower
themselves (the colocated baseline).

With `discover` (host:port of a name resolving to every encoder, a Kubernetes headless
Service: `--discover-encoders`) the pool follows the name at every poll: an address that
appears is added (unhealthy until it answers), one that disappears is dropped; NXDOMAIN (no
ready pod) means none; any other look-up failure changes nothing. Only discovered addresses
are dropped. A pool with discovery counts as configured even while empty, so image requests
get the clear NO_WORKER rather than a worker's own tower.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import grpc

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import open_channel
from baton.protos.errors import BatonError, ErrorCode

log = logging.getLogger(__name__)

POLICIES = ("min_load", "cache_affinity")


@dataclass
class EncoderState:
    """What the router knows of one encoder."""

    address: str
    healthy: bool = False
    in_progress: int = 0
    """Images the encoder reported queued or running."""
    last_error: str = ""
    checked_at: float = field(default_factory=time.monotonic)


class EncoderPool:
    """Health-checked encoders and the order a request should try them in."""

    def __init__(self, addresses: Sequence[str], policy: str = "min_load", credentials=None,
                 interval_s: float = 1.0, timeout_s: float = 2.0, discover: str = "", resolver=None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown encoder policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy, self.credentials = policy, credentials
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.encoders = {a: EncoderState(a) for a in addresses}
        self.discover = discover
        self._resolver = resolver
        self._discovered: set[str] = set()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: Optional[asyncio.Task] = None

    def __bool__(self) -> bool:
        return bool(self.encoders) or bool(self.discover)

    # --- ranking -------------------------------------------------------------------
    def ranked(self, content_hashes: Sequence[str]) -> list[str]:
        """Every encoder, in the order a request with these images should try them: the healthy
        ones by the policy, then the unhealthy ones (a last resort, never an empty list)."""
        healthy = [e for e in self.encoders.values() if e.healthy]
        if self.policy == "cache_affinity" and content_hashes:
            key = content_hashes[0]
            healthy.sort(key=lambda e: hashlib.sha256(f"{key}|{e.address}".encode()).digest(), reverse=True)
        else:
            healthy.sort(key=lambda e: (e.in_progress, e.address))
        return [e.address for e in healthy] + [e.address for e in self.encoders.values() if not e.healthy]

    def check_available(self) -> None:
        """NO_WORKER when encoders are configured and none is healthy."""
        if self and not any(e.healthy for e in self.encoders.values()):
            details = "; ".join(f"{e.address}: {e.last_error or 'not ready'}" for e in self.encoders.values()) \
                or f"none behind {self.discover}"
            raise BatonError(ErrorCode.NO_WORKER, f"no encoder is available for the request's images ({details})")

    # --- health --------------------------------------------------------------------
    def start(self) -> None:
        """Start polling (no-op without encoders)."""
        if self and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for channel in self._channels.values():
            await channel.close()

    async def check_all(self) -> None:
        """Poll every encoder once."""
        await asyncio.gather(*(self._check(state) for state in self.encoders.values()))

    async def rediscover(self) -> None:
        """Follow the discovered name once: add the addresses that appeared, drop those gone."""
        from baton.router.discovery import NameNotFound, resolve_dns, split_target
        host, port = split_target(self.discover)
        try:
            found = set(await (self._resolver or resolve_dns)(host, port))
        except NameNotFound:
            found = set()
        except Exception as error:  # noqa: BLE001 - a flaky resolver must not empty the pool
            log.warning("encoder discovery of %s failed: %s; keeping %d encoders", self.discover, error,
                        len(self.encoders))
            return
        for address in sorted(found - set(self.encoders)):
            log.info("encoder %s discovered", address)
            self.encoders[address] = EncoderState(address)
            self._discovered.add(address)
        for address in sorted(self._discovered - found):
            log.info("encoder %s is gone", address)
            self._discovered.discard(address)
            self.encoders.pop(address, None)
            channel = self._channels.pop(address, None)
            if channel is not None:
                await channel.close()

    async def _loop(self) -> None:
        while True:
            if self.discover:
                await self.rediscover()
            await self.check_all()
            await asyncio.sleep(self.interval_s)

    async def _check(self, state: EncoderState) -> None:
        channel = self._channels.get(state.address)
        if channel is None:
            channel = self._channels[state.address] = open_channel(state.address, self.credentials)
        try:
            info = await worker_pb2_grpc.EncoderStub(channel).Info(worker_pb2.WorkerInfoRequest(),
                                                                   timeout=self.timeout_s)
        except (grpc.RpcError, asyncio.TimeoutError) as error:
            was, state.healthy = state.healthy, False
            state.last_error = getattr(error, "details", lambda: str(error))() or str(error)
            if was:
                log.warning("encoder %s is unhealthy: %s", state.address, state.last_error)
            return
        healthy = info.ready and not info.draining
        if healthy and not state.healthy:
            log.info("encoder %s is healthy", state.address)
        state.healthy, state.in_progress = healthy, info.load.running_requests
        state.last_error = "" if healthy else ("draining" if info.draining else "not ready")
        state.checked_at = time.monotonic()

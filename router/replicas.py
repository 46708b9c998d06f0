"""Router replicas in front of the same workers (`--router-peers`): how many are live, and this
replica's share of the limits that must hold for the cluster as a whole.

Replicas share no state. Each learns the workers (flags or discovery), their health and,
through the workers' KV events, what each caches, by itself, so their views and their
cache-aware decisions agree. What they must agree on beyond that is a cluster-wide limit:
the router queue (`max_queued_requests`) holds for the whole cluster, so each live replica
admits `ceil(limit / live)`. `ReplicaSet` counts the live replicas: itself plus every peer
whose gRPC health (`grpc.health.v1`, overall) answered SERVING at the last check, every
`interval_s`.

Tolerance: the admitted total is at most `limit + live - 1` (the rounding) while the count
is current. For up to one interval after a peer dies the survivors keep the smaller share
(they admit less than the limit: safe); for up to one interval after a peer returns they
admit up to one share more than the limit. Killing a replica loses only the streams it was
serving; clients retrying on the Service address land on a live one.
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable, Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.protos.cluster_auth import OPEN, ClusterCredentials, open_channel

log = logging.getLogger(__name__)


class ReplicaSet:
    """The live router replicas, as this one sees them."""

    def __init__(self, peers: Sequence[str], on_change: Callable[[int], None], interval_s: float = 1.0,
                 timeout_s: float = 1.0, credentials: ClusterCredentials = OPEN) -> None:
        self.peers = list(peers)
        self.on_change = on_change
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.credentials = credentials
        self.live = 1 + len(self.peers)
        """Replicas counted live (this one included); every peer until checked, so start-up is conservative."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: Optional[asyncio.Task] = None

    @staticmethod
    def share(limit: int, live: int) -> int:
        """One replica's part of a cluster-wide `limit` when `live` replicas serve."""
        return max(1, math.ceil(limit / max(1, live)))

    def start(self) -> None:
        self.on_change(self.live)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def check(self) -> int:
        """Check every peer once; returns (and reports, when it changed) the live count."""
        answers = await asyncio.gather(*(self._serving(peer) for peer in self.peers))
        live = 1 + sum(answers)
        if live != self.live:
            log.info("router replicas live: %d of %d", live, 1 + len(self.peers))
            self.live = live
            self.on_change(live)
        return live

    async def _serving(self, peer: str) -> bool:
        channel = self._channels.get(peer)
        if channel is None:
            channel = self._channels[peer] = open_channel(peer, self.credentials)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                    timeout=self.timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

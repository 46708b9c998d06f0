"""Many simulated workers in one process (`baton serve sim`).

`SimCluster` starts `sim_prefills` prefill and `sim_decodes` decode `SimWorker`s in the
running asyncio loop, each a grpc.aio server on its own port (ports from `ServerConfig.port`
upwards when it is set, else free ones), and can kill, restart or add workers while running
(tests and the churn soak use that). `serve_sim` is the process's main: it prints (and with
`sim_address_file` writes) the addresses, then serves until SIGTERM / SIGINT.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from pathlib import Path

from baton.protos.baton.v1 import worker_pb2
from baton.services.common.server import ServerConfig
from baton.services.sim.config import SimConfig, SimFaults, SimTiming
from baton.services.sim.worker import SimWorker

log = logging.getLogger(__name__)


class SimCluster:
    """Simulated workers sharing one event loop."""

    def __init__(self, config: SimConfig = SimConfig(), timing: SimTiming = SimTiming(),
                 faults: SimFaults = SimFaults(), server: ServerConfig = ServerConfig(metrics_port=-1)) -> None:
        self.config, self.timing, self.faults = config, timing, faults
        self.server = dataclasses.replace(server, metrics_port=-1)
        self.prefills: list[SimWorker] = []
        self.decodes: list[SimWorker] = []
        self._next_port = server.port

    def _server_config(self, port: int = 0) -> ServerConfig:
        if not port and self._next_port:
            port, self._next_port = self._next_port, self._next_port + 1
        return dataclasses.replace(self.server, port=port)

    async def add(self, role: int, port: int = 0, **overrides) -> SimWorker:
        """Start one more worker of `role`; `overrides` replace `SimConfig` / `SimFaults` / `SimTiming` fields."""
        config = dataclasses.replace(self.config, **{k: v for k, v in overrides.items()
                                                     if k in SimConfig.__dataclass_fields__})
        faults = dataclasses.replace(self.faults, **{k: v for k, v in overrides.items()
                                                     if k in SimFaults.__dataclass_fields__})
        timing = dataclasses.replace(self.timing, **{k: v for k, v in overrides.items()
                                                     if k in SimTiming.__dataclass_fields__})
        worker = SimWorker(role, config, timing, faults, self._server_config(port))
        await worker.start()
        (self.decodes if role == worker_pb2.DECODE else self.prefills).append(worker)
        return worker

    async def start(self) -> "SimCluster":
        """Start every configured worker."""
        for role, count in ((worker_pb2.PREFILL, self.config.sim_prefills), (worker_pb2.DECODE, self.config.sim_decodes)):
            for _ in range(count):
                await self.add(role)
        return self

    async def restart(self, worker: SimWorker) -> SimWorker:
        """Kill `worker` (if alive) and start a fresh one (new epoch, empty cache) on its port."""
        port = int(worker.address.rsplit(":", 1)[1])
        await worker.kill()
        group = self.decodes if worker.role == worker_pb2.DECODE else self.prefills
        group.remove(worker)
        fresh = SimWorker(worker.role, worker.config, worker.timing, worker.faults, self._server_config(port))
        await fresh.start()
        group.append(fresh)
        return fresh

    def addresses(self) -> dict[str, list[str]]:
        """{"prefill": [...], "decode": [...]} of the live workers."""
        return {"prefill": [w.address for w in self.prefills if not w.dead],
                "decode": [w.address for w in self.decodes if not w.dead]}

    async def stop(self) -> None:
        """Stop every worker."""
        await asyncio.gather(*(w.stop(0) for w in self.prefills + self.decodes if not w.dead))


async def serve_sim(config: SimConfig, timing: SimTiming, faults: SimFaults, server: ServerConfig) -> int:
    """Run the simulated workers until a signal; returns the exit code."""
    cluster = await SimCluster(config, timing, faults, server).start()
    addresses = cluster.addresses()
    if config.sim_address_file:
        path = Path(config.sim_address_file)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(addresses))
        partial.replace(path)
    print(f"baton sim: {len(addresses['prefill'])} prefill and {len(addresses['decode'])} decode workers serving; "
          f"prefill={','.join(addresses['prefill'])} decode={','.join(addresses['decode'])}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await cluster.stop()
    return 0


def run_sim(config: SimConfig, timing: SimTiming, faults: SimFaults, server: ServerConfig) -> int:
    """Blocking entry point used by the CLI."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s sim %(levelname)s %(message)s")
    return asyncio.run(serve_sim(config, timing, faults, server))

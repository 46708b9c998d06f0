"""Failure injection for worker processes (tests only): `python -m tests.helpers.faulty_worker
FAULT serve ROLE ...` patches this process, then runs the normal `baton` CLI.

Faults:
- slow_transfer: every KV write sleeps 3 s before moving bytes (to kill a prefill mid-transfer);
- slow_start: the model loads 3 s late (to watch health stay NOT_SERVING while loading);
- wedge_engine: the engine's 3rd step after start hangs for 8 s (a wedged engine thread);
- slow_steps: every engine step takes 20 ms longer (a slow model: streams that outlast a drain limit).
"""
from __future__ import annotations

import sys
import time


def _slow_transfer() -> None:
    from baton.services.transfer import base

    original = base.TransferEngine.write

    def slow_write(self, *args, **kwargs):
        time.sleep(3)
        return original(self, *args, **kwargs)
    base.TransferEngine.write = slow_write


def _slow_start() -> None:
    from baton.services.worker import worker_runtime

    original = worker_runtime.WorkerRuntime.load

    async def slow_load(self, worker_id):
        import asyncio
        await asyncio.sleep(3)
        await original(self, worker_id)
    worker_runtime.WorkerRuntime.load = slow_load


def _wedge_engine() -> None:
    from baton.services.engine.engine import Engine

    original = Engine.step
    calls = [0]

    def wedged_step(self):
        calls[0] += 1
        if calls[0] == 3:
            time.sleep(8)
        return original(self)
    Engine.step = wedged_step


def _slow_steps() -> None:
    from baton.services.engine.engine import Engine

    original = Engine.step

    def slow_step(self):
        time.sleep(0.02)
        return original(self)
    Engine.step = slow_step


FAULTS = {"slow_transfer": _slow_transfer, "slow_start": _slow_start, "wedge_engine": _wedge_engine,
          "slow_steps": _slow_steps}

if __name__ == "__main__":
    FAULTS[sys.argv[1]]()
    from baton.deploy.cli import main
    sys.exit(main(sys.argv[2:]))

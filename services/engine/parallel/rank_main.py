"""The main of a tensor-parallel child rank (started by rank 0, `launch.RankProcesses`).

`python -m baton.services.engine.parallel.rank_main --rank R --size N --port P --config JSON`:
join rank 0's store on 127.0.0.1:P, build this rank's shard (`setup.build_rank`, together with the
other ranks), then run every step rank 0 writes down stdin (`runner.follow`). It ends when rank 0
says stop (status 0), when stdin ends or rank 0's process is gone (status 1: rank 0 died), and on
any error (logged, status 1). It dies with rank 0: the kernel kills it (PR_SET_PDEATHSIG) when the
rank-0 thread that started it ends, and a watch thread checks the parent twice a second.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

PARENT_POLL_S = 0.5


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends SIGKILL when the thread that started us ends (it lives as long as
    rank 0 does); a blocking C++ call (a store connect, a collective) can hold the GIL, so the
    Python watch below is only the fallback."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # rank 0 was gone before the line above
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            sys.stderr.write("baton: tensor-parallel rank: rank 0 is gone; exiting\n")
            sys.stderr.flush()
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", required=True, help="the EngineConfig as JSON")
    parser.add_argument("--parent", type=int, default=0, help="rank 0's process id (default: the parent's)")
    args = parser.parse_args(argv)
    parent = args.parent or os.getppid()
    _die_with_parent(parent)
    logging.basicConfig(level=os.environ.get("BATON_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s tp-rank-{args.rank} %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("baton.tp")
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()

    from pathlib import Path

    import torch

    from baton.services.engine.config import EngineConfig
    from baton.services.engine.parallel import group as tp_group
    from baton.services.engine.parallel.launch import read_exactly
    from baton.services.engine.parallel.runner import follow, follower_graphs
    from baton.services.engine.parallel.setup import build_rank, rank_device

    config = EngineConfig(**json.loads(args.config))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = rank_device(config.device, args.rank)
    if device.type == "cpu" and not config.num_threads:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.size))
    try:
        store = tp_group.join_store(args.port, args.size)
        group = tp_group.connect(store, args.rank, args.size, device)
        parts = build_rank(config, Path(config.model), group)
        graphs = follower_graphs(parts.model, parts.backend, parts.config.page_size, device, parts.max_model_len,
                                 parts.config.max_running_requests, parts.graph_sizes, group)
        why = follow(group, parts.model, parts.backend, parts.config.page_size, read_exactly(sys.stdin.buffer),
                     graphs)
    except Exception:
        log.exception("tensor-parallel rank %d failed", args.rank)
        return 1
    if why != "stop":
        log.error("tensor-parallel rank %d: %s; exiting", args.rank, why)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no process-group teardown at exit (it can wait on a gone peer)

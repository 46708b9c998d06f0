"""Rank 0 of a tensor-parallel engine: starting the other ranks, watching them, and its own parts.

`build_tp_engine_parts(config)` is what `engine_setup.build_engine_parts` returns for `tp_size`
> 1: it opens the rendezvous store on a free port, starts ranks 1..N-1 as child processes
(`child_command`: `rank_main` behind a two-line boot, each with a pipe on its stdin), joins the
group with them, builds its own shard like they do (`setup.build_rank`) and adds what only rank
0 has: the tokenizer, the block pool, the prefix cache, the scheduler and a `TPModelRunner`.

Failure is fast and loud (`RankProcesses`): a thread waits on every child; one that exits while
the engine runs (killed, crashed, out of memory) makes rank 0 log which rank died and how, then
end its own process with `RANK_FAILED_EXIT_CODE` at once: a worker whose model is missing a
shard cannot serve, and exiting is what its supervisor and the router act on (a worker that is
gone is failed over). The children watch rank 0 in turn: the kernel kills a child whose starting
thread (one per child, alive while it runs) ends with rank 0 (PR_SET_PDEATHSIG, Linux), and their
pipe's end or a new parent process id ends them too, so no rank outlives the engine. Every child gets the environment that
keeps NVLink multicast off (`MULTICAST_OFF`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import weakref
from typing import Callable, Optional

from baton.services.engine.config import EngineConfig

log = logging.getLogger(__name__)

RANK_FAILED_EXIT_CODE = 70
"""Exit status of rank 0 when another rank of its engine died."""

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Set in rank 0's environment and every child's: nothing may create NVLink multicast objects
(the same entries as deploy/placement.py's, which the engine may not import)."""


CHILD_BOOT = """import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, before the seconds of importing torch
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
from baton.services.engine.parallel.rank_main import main
code = main(sys.argv[2:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""
"""A child's first lines: ask the kernel for SIGKILL when its starting thread ends, then run `rank_main`."""


def child_command(rank: int, size: int, port: int, config_json: str, parent: int) -> list[str]:
    """The command line of child rank `rank` (rank 0 is process `parent`)."""
    return [sys.executable, "-c", CHILD_BOOT, str(parent), "--rank", str(rank), "--size", str(size),
            "--port", str(port), "--parent", str(parent), "--config", config_json]


def _fail_fast(message: str) -> None:
    log.critical("%s", message)
    try:
        if not logging.getLogger().handlers:  # else the log line is the visible one
            sys.stderr.write(f"baton: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(RANK_FAILED_EXIT_CODE)


class RankProcesses:
    """The child ranks 1..size-1 of one engine, their pipes, and the watch over them."""

    def __init__(self, config: EngineConfig, port: int, size: int,
                 on_failure: Callable[[str], None] = _fail_fast) -> None:
        self.on_failure = on_failure
        self.closing = False
        self._lock = threading.Lock()
        env = {**os.environ, **MULTICAST_OFF,
               "PYTHONPATH": os.pathsep.join([p for p in sys.path if p] +
                                             ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        payload = json.dumps(dataclasses.asdict(config))
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, size):
            args = child_command(rank, size, port, payload, os.getpid())
            started: list = []
            ready = threading.Event()
            threading.Thread(target=self._run, args=(rank, args, env, started, ready), name=f"tp-rank-{rank}",
                             daemon=True).start()
            ready.wait()
            if isinstance(started[0], BaseException):
                raise started[0]
            self.procs.append(started[0])

    @property
    def pids(self) -> list[int]:
        """Process ids of ranks 1.. in order."""
        return [p.pid for p in self.procs]

    def _run(self, rank: int, args: list[str], env: dict, started: list, ready: threading.Event) -> None:
        """Start one child and wait for it. The child asks the kernel to kill it when the thread that
        started it ends (PR_SET_PDEATHSIG), so this thread lives exactly as long as the child."""
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, env=env)
        except BaseException as error:  # noqa: BLE001 (handed to the starting thread)
            started.append(error)
            ready.set()
            return
        log.info("tensor-parallel rank %d started: pid %d", rank, proc.pid)
        started.append(proc)
        ready.set()
        code = proc.wait()
        if self.closing:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        self.on_failure(f"tensor-parallel rank {rank} (pid {proc.pid}) {how}: this engine cannot run without "
                        f"it; stopping rank 0 (exit {RANK_FAILED_EXIT_CODE})")

    def fail(self, message: str) -> None:
        """The engine cannot go on (unless it is closing): `on_failure` (by default: exit at once)."""
        if not self.closing:
            self.on_failure(message)

    def send(self, data: bytes) -> None:
        """Write one step message down every child's pipe."""
        with self._lock:
            for rank, proc in enumerate(self.procs, start=1):
                try:
                    proc.stdin.write(data)
                    proc.stdin.flush()
                except (BrokenPipeError, OSError, ValueError) as error:
                    if self.closing:
                        return
                    self.on_failure(f"tensor-parallel rank {rank} (pid {proc.pid}) is gone ({error}); "
                                    f"stopping rank 0 (exit {RANK_FAILED_EXIT_CODE})")
                    raise RuntimeError(f"tensor-parallel rank {rank} is gone") from error

    def close(self, timeout_s: float = 10.0) -> None:
        """Tell every child to stop, wait for them (killing a straggler)."""
        if self.closing:
            return
        from baton.services.engine.parallel.step import OP_STOP, StepMessage
        self.closing = True
        stop = StepMessage(OP_STOP).encode()
        with self._lock:  # never inside a step message another thread is writing
            for proc in self.procs:
                try:
                    proc.stdin.write(stop)
                    proc.stdin.close()
                except (BrokenPipeError, OSError, ValueError):
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel rank pid %d did not stop in %.0f s: killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait()


def build_tp_engine_parts(config: EngineConfig):
    """Rank 0's `EngineParts` of a `tp_size`-way engine (starts the other ranks)."""
    import torch

    from baton.services.engine.engine_setup import EngineParts, load_tokenizer, resolve_model_path
    from baton.services.engine.kv.block_pool import BlockPool
    from baton.services.engine.kv.null_cache import NullPrefixCache
    from baton.services.engine.kv.radix_cache import RadixCache
    from baton.services.engine.models.model_config import ModelConfig
    from baton.services.engine.parallel import group as tp_group
    from baton.services.engine.parallel.runner import TPModelRunner
    from baton.services.engine.parallel.setup import build_rank, check_supported, rank_device
    from baton.services.engine.scheduling.scheduler import Scheduler

    path = resolve_model_path(config)
    model_config = ModelConfig.from_folder(path)
    check_supported(config, model_config)
    config = dataclasses.replace(config, model=str(path))  # the children load the same folder
    device = rank_device(config.device, 0)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    elif device.type == "cpu":  # the ranks share the cores (more threads than cores: each step crawls)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tp_size))
    torch.manual_seed(config.random_seed)
    if device.type == "cuda":
        os.environ.update(MULTICAST_OFF)
    store = tp_group.open_store(config.tp_size)
    ranks = RankProcesses(config, store.port, config.tp_size)
    try:
        group = tp_group.connect(store, 0, config.tp_size, device)
        rank = build_rank(config, path, group)
        tokenizer = load_tokenizer(path)
    except BaseException:
        ranks.close(timeout_s=2.0)  # a failed start leaves no child behind
        raise
    resolved = rank.config
    pool = BlockPool(rank.kv_cache.layout.num_blocks)
    cache = (NullPrefixCache if resolved.disable_radix_cache else RadixCache)(pool, resolved.page_size)
    runner = TPModelRunner(rank.model, rank.backend, resolved.page_size, device, max_model_len=rank.max_model_len,
                           max_rows=max(resolved.max_running_requests, *rank.graph_sizes, 1),  # as the followers'
                           group=group, send=ranks.send, close=ranks.close, on_failure=ranks.fail,
                           cuda_graph_bs=rank.graph_sizes)
    runner.rank_pids = ranks.pids
    weakref.finalize(runner, ranks.close)
    eos = list(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return EngineParts(
        config=resolved, model_path=path, model_config=model_config, tokenizer=tokenizer, device=device,
        dtype=rank.dtype, kv_cache=rank.kv_cache, backend=rank.backend, pool=pool, cache=cache,
        scheduler=Scheduler(resolved, pool, cache), runner=runner, max_model_len=rank.max_model_len,
        eos_token_ids=tuple(eos))


def read_exactly(stream) -> Callable[[int], Optional[bytes]]:
    """A reader of exactly n bytes from a binary stream (None at its end), for `runner.follow`."""
    def read(n: int) -> Optional[bytes]:
        chunks, left = [], n
        while left:
            chunk = stream.read(left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    return read

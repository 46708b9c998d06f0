"""The process group of one tensor-parallel engine: its ranks, its device and its collectives.

Owns the rendezvous (a `torch.distributed.TCPStore` that rank 0 opens on a free port chosen by
the OS; the child ranks are handed the port), the backend choice (gloo for CPU tensors, NCCL for
CUDA ones) and the three collectives the parallel layers use: all-reduce (row-parallel outputs,
the vocab-parallel embedding), all-gather along the last dimension (the vocab-parallel LM head)
and broadcast from rank 0 (each step's token ids, positions and slots).

The group is built from the backend classes directly (`ProcessGroupGloo` / `ProcessGroupNCCL`),
not through `init_process_group`: no process-wide default group, so one process may hold several
engines (the tests build a TP=1 and a TP=2 one side by side). Every collective has a deadline
(`COLLECTIVE_TIMEOUT_S`): gloo raises past it, NCCL's watchdog aborts the process.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 300.0
"""Longest any collective may wait for the other ranks (a rank that hangs alive; a dead rank is
noticed sooner, by rank 0's watch over its children and by the closed connection). Generous
because ranks compile Triton kernels at their own pace during warm-up."""

STORE_TIMEOUT_S = 120.0
"""Longest the rendezvous waits for every rank to join (child start-up: imports, no model yet)."""


def open_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a free port of 127.0.0.1 (`store.port`)."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))


def join_store(port: int, world_size: int) -> dist.TCPStore:
    """A child rank's client of rank 0's store."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                         timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))


@dataclass
class TPGroup:
    """One engine's ranks; every rank holds one (rank 0 schedules, all of them compute)."""

    rank: int
    size: int
    device: torch.device
    """This rank's device (the tensors its collectives take live there)."""
    pg: Any
    """The torch.distributed backend process group (gloo or NCCL)."""
    store: Any = None
    """The rendezvous store (kept alive with the group: rank 0's is the server)."""

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        self.pg.allreduce([tensor]).wait()
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """[rows, n] on each rank -> [rows, size * n], rank 0's columns first."""
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.size * tensor.shape[0],) + tuple(tensor.shape[1:]))
        self.pg._allgather_base(out, tensor).wait()
        rows, cols = tensor.shape[0], tensor.shape[-1]
        return out.view(self.size, rows, cols).permute(1, 0, 2).reshape(rows, self.size * cols)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (same shape and dtype), in place; returns it."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. the KV blocks each rank's memory holds)."""
        t = torch.tensor([-int(value)], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([t], opts).wait()
        return -int(t.item())

    def barrier(self) -> None:
        """Wait until every rank gets here (a one-element all-reduce on the group's device)."""
        self.all_reduce(torch.zeros(1, device=self.device))


def connect(store: Any, rank: int, size: int, device: torch.device, name: str = "tp") -> TPGroup:
    """Join the group of `size` ranks over `store` (every rank calls it; it returns once all have)."""
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    prefixed = dist.PrefixStore(name, store)
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError("--tp on CUDA needs torch.distributed with NCCL")
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, size, opts)
        if hasattr(pg, "_set_sequence_number_for_group"):  # as init_process_group does (every rank calls it)
            pg._set_sequence_number_for_group()
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        pg = dist.ProcessGroupGloo(prefixed, rank, size, opts)
    group = TPGroup(rank, size, device, pg, store)
    group.barrier()
    return group

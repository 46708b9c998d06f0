"""Where `baton up` puts each worker: which GPU, and what share of its memory.

Workers (prefills first, then decodes) are dealt round-robin over the GPUs: with at least as
many GPUs as workers each worker gets its own; otherwise several share one. A tensor-parallel
worker (`--tp N`) takes N consecutive GPUs, one per rank (its process sees all N). Each process
sees only its GPU (`CUDA_VISIBLE_DEVICES`), and the workers on one GPU split it by an explicit
share: each gets `mem_fraction_static / workers on that GPU` of the GPU's memory for its
weights, KV pool and activations (the engine sizes its KV pool from its own share, never
from whatever memory happens to be free, so processes starting together do not race).

On a machine without CUDA (or with `--device cpu`) nothing is placed.
Every process Baton starts also gets the environment that keeps NVLink multicast off
(NCCL NVLS, torch symmetric-memory multicast, NVSHMEM NVLS): see `MULTICAST_OFF`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Environment for every process `baton up` starts: nothing may create NVLink multicast objects."""


@dataclass(frozen=True)
class Placement:
    """One worker's GPU and memory share."""

    gpu: Optional[int]
    """Physical GPU index (CUDA_VISIBLE_DEVICES for the process); None: CPU or not placed."""
    mem_fraction: Optional[float]
    """This process's share of the GPU's memory (--mem-fraction-static); None: the engine's default."""
    gpus: tuple[int, ...] = ()
    """A tensor-parallel worker's GPUs, one per rank (`gpu` is the first); empty: just `gpu`."""

    @property
    def all_gpus(self) -> tuple[int, ...]:
        """Every GPU of the worker (rank r on the r-th); empty when not placed."""
        return self.gpus or (() if self.gpu is None else (self.gpu,))

    def env(self) -> dict[str, str]:
        """Environment entries for the worker's process."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.all_gpus))} if self.all_gpus else {}


def parse_gpus(text: str) -> list[int]:
    """'0,1,3' -> [0, 1, 3]; a clear ValueError for anything else."""
    if not text.strip():
        return []
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpus {text!r}: give comma-separated GPU indices, e.g. 0,1") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {text!r}: indices must be distinct and non-negative")
    return gpus


def place_workers(num_workers: int, gpus: list[int], mem_fraction_static: float, tp: int = 1) -> list[Placement]:
    """Placements for `num_workers` workers over `gpus` (empty: none placed). With `tp` ranks per
    worker, worker i gets GPUs [i*tp, (i+1)*tp) (modulo the list: fewer GPUs are shared); a GPU's
    memory is split between the workers with a rank on it."""
    if not gpus:
        return [Placement(None, None) for _ in range(num_workers)]
    if tp > len(gpus):
        raise ValueError(f"--tp {tp} puts each rank of a worker on its own GPU: it needs at least {tp} GPUs, "
                         f"--gpus (or the visible ones) gives {len(gpus)}")
    groups = [tuple(gpus[(i * tp + r) % len(gpus)] for r in range(tp)) for i in range(num_workers)]
    sharing = Counter(g for group in groups for g in group)
    return [Placement(group[0], round(mem_fraction_static / max(sharing[g] for g in group), 4),
                      group if tp > 1 else ()) for group in groups]


def visible_gpus(device: str) -> list[int]:
    """The GPUs to place on when `--gpus` is not given: every visible one, unless the engine
    runs on the CPU."""
    if device == "cpu":
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    if device.startswith("cuda:"):
        return [int(device.split(":", 1)[1])]
    return list(range(torch.cuda.device_count()))


def choose_transfer(requested: str, placements: list[Placement]) -> str:
    """The KV transfer backend for `baton up`: `requested` unless it is "auto". Auto picks
    cuda_ipc when every worker sits on one GPU (device-to-device copies, no host staging),
    nixl when the workers are on several GPUs and NIXL is installed, and tcp otherwise
    (CPU workers, or no NIXL). nccl is never picked, only asked for (it needs a GPU per worker:
    NCCL cannot connect two processes on one GPU, so that placement is refused here)."""
    if requested == "nccl" and len(placements) > 1 and len({p.gpu for p in placements} - {None}) == 1:
        raise ValueError("--transfer nccl needs the workers on different GPUs (NCCL cannot connect two processes "
                         "on one GPU): give --gpus with one GPU per worker, or use --transfer cuda_ipc")
    if requested != "auto":
        return requested
    gpus = {p.gpu for p in placements}
    if not placements or None in gpus:
        return "tcp"
    if len(gpus) == 1:
        return "cuda_ipc"
    try:
        import nixl  # noqa: F401  (only whether it is installed)
    except ImportError:
        return "tcp"
    return "nixl"


def ray_transfer(requested: str, on_gpu: bool) -> str:
    """The backend for Ray workers, which may sit on different hosts: `requested` unless it is
    "auto"; auto picks nixl for GPU workers when NIXL is installed, tcp otherwise."""
    if requested != "auto":
        return requested
    if on_gpu:
        try:
            import nixl  # noqa: F401
            return "nixl"
        except ImportError:
            pass
    return "tcp"

"""Where `baton up` puts each worker: which GPU, and what share of its memory.

Workers (prefills first, then decodes) are dealt round-robin over the GPUs: with at least as
many GPUs as workers each worker gets its own; otherwise several share one. Each process
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

    def env(self) -> dict[str, str]:
        """Environment entries for the worker's process."""
        return {} if self.gpu is None else {"CUDA_VISIBLE_DEVICES": str(self.gpu)}


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


def place_workers(num_workers: int, gpus: list[int], mem_fraction_static: float) -> list[Placement]:
    """Placements for `num_workers` workers over `gpus` (empty: none placed)."""
    if not gpus:
        return [Placement(None, None) for _ in range(num_workers)]
    assigned = [gpus[i % len(gpus)] for i in range(num_workers)]
    sharing = Counter(assigned)
    return [Placement(gpu, round(mem_fraction_static / sharing[gpu], 4)) for gpu in assigned]


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
    (CPU workers, or no NIXL)."""
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

"""Settings of a prefill or decode worker process beyond its engine and gRPC server."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TransferName = Literal["tcp", "nixl"]


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker hands KV blocks over and how long it waits for each hop."""

    transfer: TransferName = "tcp"
    """KV transfer backend: tcp (pyzmq, host memory) or nixl (UCX; DRAM on CPU, VRAM on GPU)."""
    transfer_timeout_s: float = 30.0
    """Longest a KV transfer (handshake + write) may take before it fails."""
    prefill_timeout_s: float = 120.0
    """Longest decode waits for a prefill worker's hand-off (queueing + compute + transfer)."""
    max_queued_requests: int = 1024
    """Requests waiting beyond this are refused with OVERLOADED."""
    engine_stall_timeout_s: float = 60.0
    """One engine step or command running longer than this makes health NOT_SERVING (a wedged
    engine), until the engine moves again."""
    worker_id: str = ""
    """Name of this worker for peers and the router; default: host:port."""
    transfer_host: str = "127.0.0.1"
    """Address the tcp KV transfer listener binds (0.0.0.0 in a container; nixl binds every address)."""
    advertise_host: str = ""
    """Address peers dial for this worker's tcp KV transfer (the pod IP in Kubernetes); default: transfer_host."""

    def __post_init__(self) -> None:
        if self.transfer not in ("tcp", "nixl"):
            raise ValueError("transfer must be tcp or nixl")
        if self.transfer_timeout_s <= 0 or self.prefill_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.engine_stall_timeout_s <= 0:
            raise ValueError("engine_stall_timeout_s must be positive")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be at least 1")

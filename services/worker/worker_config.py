"""Settings of a prefill or decode worker process beyond its engine and gRPC server."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TransferName = Literal["tcp", "nixl", "cuda_ipc", "nccl"]


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker hands KV blocks over and how long it waits for each hop."""

    transfer: TransferName = "tcp"
    """KV transfer backend: tcp (pyzmq, host memory), nixl (UCX; DRAM on CPU, VRAM on GPU), cuda_ipc (GPU to GPU on one host) or nccl (torch.distributed send/recv: NCCL between GPUs, gloo on CPU)."""
    transfer_timeout_s: float = 30.0
    """Longest a KV transfer (handshake + write) may take before it fails."""
    prefill_timeout_s: float = 120.0
    """Longest decode waits for a prefill worker's hand-off (queueing + compute + transfer)."""
    max_queued_requests: int = 1024
    """Requests waiting beyond this are refused with OVERLOADED."""
    engine_stall_timeout_s: float = 60.0
    """One engine step or command running longer than this makes health NOT_SERVING (a wedged
    engine), until the engine moves again."""
    gil_switch_interval_s: float = 0.0005
    """Python's thread switch interval in this process (sys.setswitchinterval; 0: leave Python's 5 ms). The
    engine thread runs Python between kernel launches; at 5 ms a token's gRPC reply can wait that long for
    the GIL. 0.5 ms takes most of that wait out of TTFT and ITL."""
    worker_id: str = ""
    """Name of this worker for peers and the router; default: host:port."""
    transfer_host: str = ""
    """Address the tcp KV transfer listener binds (default: the gRPC --host; nixl binds every address)."""
    advertise_host: str = ""
    """Address peers dial for this worker's tcp KV transfer (the pod IP in Kubernetes); default: transfer_host."""
    max_grammar_bytes: int = 65536
    """Largest structured-output spec (JSON schema, regex or EBNF text) accepted; larger is refused (400)."""
    grammar_compile_timeout_s: float = 10.0
    """Longest a request waits for its grammar to compile (off the engine thread); longer fails that request (400)."""
    grammar_compile_threads: int = 2
    """Grammars compiled at once (each in its own thread); a compile past its time limit keeps its slot until it ends."""

    def __post_init__(self) -> None:
        if self.transfer not in ("tcp", "nixl", "cuda_ipc", "nccl"):
            raise ValueError("transfer must be tcp, nixl, cuda_ipc or nccl")
        if self.transfer_timeout_s <= 0 or self.prefill_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.gil_switch_interval_s < 0:
            raise ValueError("gil_switch_interval_s must be >= 0")
        if self.engine_stall_timeout_s <= 0:
            raise ValueError("engine_stall_timeout_s must be positive")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be at least 1")
        if self.max_grammar_bytes < 1 or self.grammar_compile_timeout_s <= 0 or self.grammar_compile_threads < 1:
            raise ValueError("max_grammar_bytes, grammar_compile_timeout_s and grammar_compile_threads must be positive")

"""KV / embedding transfer engines behind one interface (see base.py); knows no engine.

What an engine moves is a `RegisteredMemory` (memory.py: named regions of tensors, each with
its block geometry; a worker describes its KV cache as the "kv" region). Backends: `tcp`
(pyzmq, host memory; tcp.py), `nixl` (NIXL over UCX; nixl.py, which loads the NIXL
library only when such an engine is built), `cuda_ipc` (one host's GPUs; cuda_ipc.py) and
`nccl` (torch.distributed send / recv per peer pair: NCCL on GPUs, gloo on CPU; nccl.py). Build one with
`create_transfer_engine(backend, worker_id, memory)` (factory.py). The tcp port authenticates
its peers with a key derived from the cluster secret (`auth_key`, peer_auth.py).
"""
from baton.services.transfer.base import (
    LayoutMismatch,
    PeerDescriptor,
    TransferEngine,
    TransferError,
    TransferHandle,
    TransferState,
)
from baton.services.transfer.factory import create_transfer_engine
from baton.services.transfer.memory import (
    BlockGeometry,
    MemoryLayout,
    MemoryRegion,
    RegionLayout,
    RegisteredMemory,
    kv_region_layout,
)

__all__ = [
    "BlockGeometry",
    "LayoutMismatch",
    "MemoryLayout",
    "MemoryRegion",
    "PeerDescriptor",
    "RegionLayout",
    "RegisteredMemory",
    "TransferEngine",
    "TransferError",
    "TransferHandle",
    "TransferState",
    "create_transfer_engine",
    "kv_region_layout",
]

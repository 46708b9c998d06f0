"""KV / embedding transfer engines behind one interface (see base.py).

Backends: `tcp` (pyzmq, host memory; tcp.py) and `nixl` (NIXL over UCX; nixl.py, imported
only when asked for). Build one with `create_transfer_engine(backend, worker_id, kv_cache)`.
"""
from baton.services.transfer.base import (
    LayoutMismatch,
    PeerDescriptor,
    TransferEngine,
    TransferError,
    TransferHandle,
    TransferState,
    create_transfer_engine,
)

__all__ = [
    "LayoutMismatch",
    "PeerDescriptor",
    "TransferEngine",
    "TransferError",
    "TransferHandle",
    "TransferState",
    "create_transfer_engine",
]

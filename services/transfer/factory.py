"""Builds the transfer engine a worker's flags name.

Owns `create_transfer_engine`, the one place that knows every backend. It imports the
backends (which import base.py); base.py imports no backend, so the modules form no cycle.
The NIXL library itself is loaded only when a nixl engine is built (nixl.py's constructor).
"""
from __future__ import annotations

from baton.services.transfer.base import TransferEngine
from baton.services.transfer.cuda_ipc import CudaIpcTransferEngine
from baton.services.transfer.descriptor import BACKENDS
from baton.services.transfer.memory import RegisteredMemory
from baton.services.transfer.nccl import NcclTransferEngine
from baton.services.transfer.nixl import NixlTransferEngine
from baton.services.transfer.tcp import TcpTransferEngine

_ENGINES: dict[str, type[TransferEngine]] = {"tcp": TcpTransferEngine, "nixl": NixlTransferEngine,
                                             "cuda_ipc": CudaIpcTransferEngine, "nccl": NcclTransferEngine}
"""One engine class per name in `BACKENDS`."""


def create_transfer_engine(backend: str, worker_id: str, memory: RegisteredMemory, **options) -> TransferEngine:
    """Build the engine for `backend` ("tcp", "nixl", "cuda_ipc" or "nccl") over `memory`; `options` go to its constructor."""
    engine = _ENGINES.get(backend)
    if engine is None:
        raise ValueError(f"unknown transfer backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return engine(worker_id, memory, **options)

"""Peer identity and layout compatibility, shared by every transfer backend.

Owns `PeerDescriptor` (worker id + epoch + backend metadata + the layout of the peer's
registered memory, convertible to the `baton.v1.TransferPeer` proto), the layout check that
makes mismatched workers fail loudly (`LayoutMismatch` names every differing field), and the
transfer error types. On the wire the layout is a `baton.v1.KVLayout`, which describes one
region, the KV cache (memory.py's `kv_region_layout`); a memory with other regions has no
wire form until the proto gains one (`to_proto` refuses it with a ValueError).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.protos.baton.v1 import kv_pb2
from baton.services.transfer.memory import (
    MemoryLayout,
    dtype_name,
    kv_region_layout,
    kv_sizes,
    layout_mismatches,
)

BACKENDS = ("tcp", "nixl", "cuda_ipc", "nccl")
_BACKEND_TO_PROTO = {"tcp": kv_pb2.TCP, "nixl": kv_pb2.NIXL, "cuda_ipc": kv_pb2.CUDA_IPC, "nccl": kv_pb2.NCCL}
_PROTO_TO_BACKEND = {v: k for k, v in _BACKEND_TO_PROTO.items()}


class TransferError(RuntimeError):
    """A transfer or handshake could not be done."""


class LayoutMismatch(TransferError):
    """Two workers' memory layouts disagree on a field that must match."""


def dtype_from_name(name: str) -> torch.dtype:
    """"float32" -> torch.float32 (ValueError for anything that is not a torch dtype)."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype name {name!r}")
    return value


def check_layout(local: MemoryLayout, remote: MemoryLayout, peer: str) -> None:
    """Raise LayoutMismatch naming every differing field (num_blocks may differ)."""
    diffs = layout_mismatches(local, remote)
    if diffs:
        raise LayoutMismatch(mismatch_message(peer, diffs))


def mismatch_message(peer: str, diffs: list[str]) -> str:
    """The LayoutMismatch text for the differences `layout_mismatches` found with `peer`."""
    return f"memory layout mismatch with peer {peer!r}: " + ", ".join(diffs)


def layout_to_proto(layout: MemoryLayout) -> kv_pb2.KVLayout:
    """The wire form of a KV-cache layout (ValueError for any other memory)."""
    sizes = kv_sizes(layout)
    return kv_pb2.KVLayout(
        num_layers=sizes["num_layers"], page_size=sizes["page_size"], num_kv_heads=sizes["num_kv_heads"],
        head_dim=sizes["head_dim"], dtype=dtype_name(sizes["dtype"]), num_blocks=sizes["num_blocks"],
        scales=layout.regions[0].scales)


def layout_from_proto(msg: kv_pb2.KVLayout) -> MemoryLayout:
    return MemoryLayout((kv_region_layout(
        num_layers=msg.num_layers, num_blocks=msg.num_blocks, page_size=msg.page_size,
        num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim, dtype=dtype_from_name(msg.dtype),
        scales=tuple(msg.scales)),))


@dataclass(frozen=True)
class PeerDescriptor:
    """Everything a peer needs to reach a transfer engine."""

    worker_id: str
    epoch: int
    backend: str
    """"tcp", "nixl", "cuda_ipc" or "nccl"."""
    metadata: bytes
    """Backend-specific: the zmq endpoint (tcp, cuda_ipc, nccl) or packed NIXL metadata (nixl)."""
    layout: MemoryLayout
    """The peer's registered memory (what `connect` compares with its own)."""

    def to_proto(self) -> kv_pb2.TransferPeer:
        if self.backend not in _BACKEND_TO_PROTO:
            raise ValueError(f"unknown transfer backend {self.backend!r}")
        return kv_pb2.TransferPeer(
            worker_id=self.worker_id, epoch=self.epoch, backend=_BACKEND_TO_PROTO[self.backend],
            metadata=self.metadata, layout=layout_to_proto(self.layout))

    @classmethod
    def from_proto(cls, msg: kv_pb2.TransferPeer) -> "PeerDescriptor":
        if msg.backend not in _PROTO_TO_BACKEND:
            raise ValueError(f"unsupported transfer backend {kv_pb2.TransferBackend.Name(msg.backend)}")
        return cls(worker_id=msg.worker_id, epoch=msg.epoch, backend=_PROTO_TO_BACKEND[msg.backend],
                   metadata=bytes(msg.metadata), layout=layout_from_proto(msg.layout))

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PeerDescriptor":
        msg = kv_pb2.TransferPeer()
        msg.ParseFromString(data)
        return cls.from_proto(msg)

"""Peer identity and KV-layout compatibility, shared by every transfer backend.

Owns `PeerDescriptor` (worker id + epoch + backend metadata + KV layout, convertible to the
`baton.v1.TransferPeer` proto), the layout comparison that makes mismatched workers fail
loudly (`LayoutMismatch` names every differing field), and the transfer error types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.protos.baton.v1 import kv_pb2
from baton.services.engine.kv.kv_cache import KVLayout

BACKENDS = ("tcp", "nixl")
_BACKEND_TO_PROTO = {"tcp": kv_pb2.TCP, "nixl": kv_pb2.NIXL}
_PROTO_TO_BACKEND = {v: k for k, v in _BACKEND_TO_PROTO.items()}
MATCHED_LAYOUT_FIELDS = ("num_layers", "page_size", "num_kv_heads", "head_dim", "dtype")


class TransferError(RuntimeError):
    """A transfer or handshake could not be done."""


class LayoutMismatch(TransferError):
    """Two workers' KV layouts disagree on a field that must match."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32"."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """"float32" -> torch.float32 (ValueError for anything that is not a torch dtype)."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype name {name!r}")
    return value


def layout_mismatches(local: KVLayout, remote: KVLayout) -> list[str]:
    """The fields that must agree but do not, as "field: local=X remote=Y"."""
    out = []
    for name in MATCHED_LAYOUT_FIELDS:
        a, b = getattr(local, name), getattr(remote, name)
        if a != b:
            if name == "dtype":
                a, b = dtype_name(a), dtype_name(b)
            out.append(f"{name}: local={a} remote={b}")
    return out


def check_layout(local: KVLayout, remote: KVLayout, peer: str) -> None:
    """Raise LayoutMismatch naming every differing field (num_blocks may differ)."""
    diffs = layout_mismatches(local, remote)
    if diffs:
        raise LayoutMismatch(f"KV layout mismatch with peer {peer!r}: " + ", ".join(diffs))


def block_bytes(layout: KVLayout) -> int:
    """Bytes of one block of one layer's K (or V) tensor."""
    element = torch.empty((), dtype=layout.dtype).element_size()
    return layout.page_size * layout.num_kv_heads * layout.head_dim * element


def layout_to_proto(layout: KVLayout) -> kv_pb2.KVLayout:
    return kv_pb2.KVLayout(
        num_layers=layout.num_layers, page_size=layout.page_size,
        num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
        dtype=dtype_name(layout.dtype), num_blocks=layout.num_blocks)


def layout_from_proto(msg: kv_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        num_layers=msg.num_layers, num_blocks=msg.num_blocks, page_size=msg.page_size,
        num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim, dtype=dtype_from_name(msg.dtype))


@dataclass(frozen=True)
class PeerDescriptor:
    """Everything a peer needs to reach a transfer engine."""

    worker_id: str
    epoch: int
    backend: str
    """"tcp" or "nixl"."""
    metadata: bytes
    """Backend-specific: the zmq endpoint (tcp) or packed NIXL metadata (nixl)."""
    layout: KVLayout

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

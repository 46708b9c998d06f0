"""The `cuda_ipc` transfer backend: KV blocks copied GPU to GPU by the sender, on one host.

Owns the data path for workers whose registered memory is on CUDA devices of the same
machine (one GPU shared by a prefill and a decode worker, or GPUs with peer access): at
the handshake the receiver hands the sender CUDA IPC handles of its registered tensors
(`UntypedStorage._share_cuda_`, the same mechanism torch.multiprocessing uses); the
sender opens them once and from then on a write is two device kernels per tensor
(gather the source blocks, scatter them into the receiver's blocks) on a transfer stream
of its own, followed by a stream synchronize and a "landed" message. No byte goes
through host memory, so a 150 MB prompt moves in well under a millisecond of copy time
instead of the hundreds of milliseconds the tcp backend's host staging takes.

The control plane (hello, data notification, epoch checks, link handling) is the tcp
backend's zmq protocol, reused by subclassing; the differences on the wire:
  hello reply: [b"ok", req_id, TransferPeer bytes, JSON list of IPC handles]
  data:        [b"data", req_id, JSON header with "ipc": true and "nbytes"] (no payload)
A receiver takes only "ipc" data messages. The handles are plain fields (ints, hex
strings), never pickles, so a peer cannot make this process run code by answering hello.
"""
from __future__ import annotations

import json
import threading
from typing import Optional

import torch

from baton.services.transfer.descriptor import PeerDescriptor, TransferError
from baton.services.transfer.memory import RegisteredMemory
from baton.services.transfer.tcp import TcpTransferEngine


def export_ipc_handles(memory: RegisteredMemory) -> list[dict]:
    """One JSON-able record per registered tensor: the CUDA IPC handle of its storage and
    the tensor's place in it (element offset, shape, strides, dtype)."""
    records = []
    for blocks, region in memory.tensor_blocks():
        storage = blocks.untyped_storage()
        (_device, handle, size_bytes, offset_bytes, ref_handle, ref_offset,
         event_handle, event_sync) = storage._share_cuda_()
        records.append({
            "handle": handle.hex(), "size_bytes": int(size_bytes), "offset_bytes": int(offset_bytes),
            "ref_handle": ref_handle.hex(), "ref_offset": int(ref_offset),
            "event_handle": event_handle.hex() if event_handle else "", "event_sync": bool(event_sync),
            "tensor_offset": int(blocks.storage_offset()), "shape": list(blocks.shape),
            "stride": list(blocks.stride()), "dtype": str(region.geometry.dtype).removeprefix("torch."),
        })
    return records


def open_ipc_handles(records: list[dict], device: torch.device) -> list[torch.Tensor]:
    """The peer's registered tensors, mapped into this process on `device` (same GPU, or a
    GPU with peer access to it). TransferError when a handle cannot be opened."""
    tensors = []
    opened: dict[tuple[str, int], torch.UntypedStorage] = {}
    with torch.cuda.device(device):
        for rec in records:
            key = (rec["handle"], rec["offset_bytes"])
            storage = opened.get(key)
            if storage is None:
                try:
                    storage = torch.UntypedStorage._new_shared_cuda(
                        device.index or 0, bytes.fromhex(rec["handle"]), rec["size_bytes"], rec["offset_bytes"],
                        bytes.fromhex(rec["ref_handle"]), rec["ref_offset"],
                        bytes.fromhex(rec["event_handle"]) if rec["event_handle"] else b"", rec["event_sync"])
                except RuntimeError as exc:
                    raise TransferError(f"cannot open the peer's CUDA IPC handle (is it on this host, on a GPU "
                                        f"this one can reach?): {exc}") from exc
                opened[key] = storage
            dtype = getattr(torch, rec["dtype"])
            tensor = torch.empty(0, dtype=dtype, device=device)
            tensor.set_(storage, rec["tensor_offset"], rec["shape"], rec["stride"])
            tensors.append(tensor)
    return tensors


class CudaIpcTransferEngine(TcpTransferEngine):
    """Transfer engine for CUDA memory on one host: device-to-device copies through IPC handles."""

    backend = "cuda_ipc"

    def __init__(self, worker_id: str, memory: RegisteredMemory, **options) -> None:
        if memory.device.type != "cuda":
            raise ValueError(f"the cuda_ipc transfer backend needs registered memory on a CUDA device, "
                             f"not {memory.device}; use tcp or nixl")
        super().__init__(worker_id, memory, **options)
        self._handles = export_ipc_handles(memory)
        self._remote: dict[str, list[torch.Tensor]] = {}
        self._remote_lock = threading.Lock()
        self._stream = torch.cuda.Stream(memory.device)

    # -- handshake hooks (see TcpTransferEngine) ----------------------------------------
    def _hello_extra(self) -> list[bytes]:
        return [json.dumps(self._handles).encode()]

    def _accept_peer(self, peer: PeerDescriptor, extra: list[bytes]) -> None:
        if not extra:
            raise TransferError(f"peer {peer.worker_id!r} sent no CUDA IPC handles at the handshake")
        records = json.loads(bytes(extra[0]))
        if len(records) != len(self.memory.tensor_blocks()):
            raise TransferError(f"peer {peer.worker_id!r} shares {len(records)} tensors, "
                                f"this engine registers {len(self.memory.tensor_blocks())}")
        tensors = open_ipc_handles(records, self.memory.device)
        for (local, _), remote in zip(self.memory.tensor_blocks(), tensors):
            if tuple(remote.shape[1:]) != tuple(local.shape[1:]) or remote.dtype != local.dtype:
                raise TransferError(f"peer {peer.worker_id!r} tensor {tuple(remote.shape)} {remote.dtype} does not "
                                    f"match local {tuple(local.shape)} {local.dtype}")
        with self._remote_lock:
            self._remote[peer.worker_id] = tensors

    def _drop_peer(self, peer: PeerDescriptor) -> None:
        with self._remote_lock:
            self._remote.pop(peer.worker_id, None)
        super()._drop_peer(peer)

    # -- data path ----------------------------------------------------------------------
    def _write(self, peer: PeerDescriptor, transfer_id: str, src: list[int], dst: list[int],
               nbytes: int, deadline: float) -> Optional[str]:
        with self._links_lock:
            link = self._links.get(peer.worker_id)
        with self._remote_lock:
            remote = self._remote.get(peer.worker_id)
        if link is None or remote is None:
            return "not connected"
        if src:
            device = self.memory.device
            with torch.cuda.stream(self._stream):
                src_idx = torch.tensor(src, dtype=torch.long).to(device, non_blocking=True)
                dst_idx = torch.tensor(dst, dtype=torch.long).to(device, non_blocking=True)
                for (local, _), target in zip(self.memory.tensor_blocks(), remote):  # raw bytes, fp8 too
                    rows = local.view(torch.uint8).index_select(0, src_idx)
                    target.view(torch.uint8).index_copy_(0, dst_idx, rows)
            self._stream.synchronize()  # the bytes are in the peer's memory before it hears of them
        header = json.dumps({"transfer_id": transfer_id, "target_epoch": peer.epoch, "source": self.worker_id,
                             "dst": dst, "ipc": True, "nbytes": nbytes}).encode()
        try:
            kind, body = link.request(b"data", [header], deadline)
        except (TimeoutError, TransferError) as exc:
            return str(exc)
        if kind != b"ok":
            return body[0].decode() if body else f"peer replied {kind!r}"
        return None

    def _receive_data(self, header: dict, payload: list) -> list[bytes]:
        transfer_id = str(header["transfer_id"])
        if header.get("target_epoch") != self.epoch:
            return [b"error", (f"stale epoch: sender targets {self.worker_id!r} epoch {header.get('target_epoch')},"
                               f" this engine is epoch {self.epoch} (peer restarted; reconnect)").encode()]
        dst = [int(d) for d in header.get("dst", [])]
        error = None
        if not header.get("ipc") or payload:
            error = "malformed message: a cuda_ipc engine takes only device-copied data notifications"
        elif any(not 0 <= d < self.layout.num_blocks for d in dst):
            error = f"destination blocks out of range (this engine has {self.layout.num_blocks})"
        elif int(header.get("nbytes", -1)) != len(dst) * self.bytes_per_block:
            error = f"notification says {header.get('nbytes')} bytes for {len(dst)} blocks"
        if error is not None:
            self._landed(transfer_id, 0, error)
            return [b"error", error.encode()]
        self._landed(transfer_id, len(dst) * self.bytes_per_block)
        return [b"ok"]

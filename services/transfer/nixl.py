"""The `nixl` transfer backend: one-sided RDMA-style WRITEs through a NIXL agent over UCX.

Owns one NIXL agent per engine, named f"{worker_id}-{epoch}" so that a restarted worker
at the same address is a different agent, with every tensor of the `RegisteredMemory`
registered (DRAM for CPU tensors, VRAM for CUDA ones: the memory type follows the device).
The agent's listener thread is off: metadata travels in our own `PeerDescriptor`.

Descriptor metadata format (little-endian), version 2:
    header  struct "<4sHHII": magic b"BXNX", version (2), memory type (0 DRAM, 1 VRAM),
            device id, tensor count R (every registered tensor, in the memory's order:
            for the KV region K_0, V_0, K_1, V_1, ...)
    R x u64 base address of each tensor
    R x u64 block bytes of each tensor (one block of it)
    rest    the NIXL agent metadata (nixl_agent.get_agent_metadata())
Block b of tensor r lives at [addr_r + b * block_bytes_r, addr_r + (b + 1) * block_bytes_r).

A write posts one WRITE request covering every (tensor, run) range, where a run is
a stretch of pairs with consecutive src and consecutive dst blocks (coalesced into one
descriptor), with notification message b"<bytes> <transfer_id> <mac>"; NIXL delivers the
notification only after the data has landed, so the receiver marks the transfer SUCCESS
when it reads the notification (`received` polls get_new_notifs). The MAC
(peer_auth.notif_mac: the key derived from the cluster secret over the receiving agent's
name, so its epoch, the byte count and the transfer id) must verify: a notification from
anyone else is dropped and logged, so it can neither complete nor fail a transfer. The
memory itself is reachable only by an agent that loaded this engine's metadata, which
travels in authenticated gRPC calls alone (docs/security.md).
"""
from __future__ import annotations

import hmac
import struct
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from baton.services.transfer.base import TransferEngine
from baton.services.transfer.descriptor import PeerDescriptor, TransferError
from baton.services.transfer.memory import RegisteredMemory
from baton.services.transfer.peer_auth import SessionTable, notif_mac

_MAGIC = b"BXNX"
_VERSION = 2
_HEADER = struct.Struct("<4sHHII")
_MEM_TYPES = ("DRAM", "VRAM")


@dataclass(frozen=True)
class NixlPeerInfo:
    """The decoded metadata of a nixl descriptor."""

    mem_type: str
    device_id: int
    addresses: tuple[int, ...]
    """Base address of each registered tensor."""
    block_bytes: tuple[int, ...]
    """Bytes of one block of each registered tensor."""
    agent_metadata: bytes


def pack_metadata(info: NixlPeerInfo) -> bytes:
    count = len(info.addresses)
    if len(info.block_bytes) != count:
        raise ValueError(f"{count} addresses but {len(info.block_bytes)} block sizes")
    head = _HEADER.pack(_MAGIC, _VERSION, _MEM_TYPES.index(info.mem_type), info.device_id, count)
    return head + struct.pack(f"<{2 * count}Q", *info.addresses, *info.block_bytes) + info.agent_metadata


def unpack_metadata(data: bytes) -> NixlPeerInfo:
    if len(data) < _HEADER.size:
        raise TransferError(f"nixl metadata too short ({len(data)} bytes)")
    magic, version, mem, device_id, count = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION or mem >= len(_MEM_TYPES):
        raise TransferError(f"not baton nixl metadata v{_VERSION} (magic {magic!r}, version {version})")
    end = _HEADER.size + 16 * count
    if len(data) < end:
        raise TransferError(f"nixl metadata too short for {count} tensors ({len(data)} bytes)")
    table = struct.unpack_from(f"<{2 * count}Q", data, _HEADER.size)
    return NixlPeerInfo(_MEM_TYPES[mem], device_id, tuple(table[:count]), tuple(table[count:]), bytes(data[end:]))


def coalesce(src: list[int], dst: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src_start, dst_start, count) runs where both src and dst are consecutive."""
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    order = np.argsort(s, kind="stable")
    s, d = s[order], d[order]
    brk = np.ones(len(s), dtype=bool)
    brk[1:] = (np.diff(s) != 1) | (np.diff(d) != 1)
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, len(s)))
    return s[starts], d[starts], counts


@dataclass(frozen=True)
class _Remote:
    agent_name: str
    info: NixlPeerInfo
    addresses: np.ndarray


class NixlTransferEngine(TransferEngine):
    """Transfer engine over a NIXL agent (UCX backend)."""

    backend = "nixl"

    def __init__(self, worker_id: str, memory: RegisteredMemory, num_threads: int = 0, auth_key: bytes = b"") -> None:
        super().__init__(worker_id, memory)
        self._auth_key = auth_key
        self._refusals = SessionTable(auth_key)  # only its refusal count and rate-limited log
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.agent_name = f"{worker_id}-{self.epoch}"
        config = nixl_agent_config(
            enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"], num_threads=num_threads,
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)  # writers and pollers share the agent
        self._agent = nixl_agent(self.agent_name, config)
        if "UCX" not in self._agent.backends:
            raise TransferError("the NIXL UCX backend could not be created")
        self._tensors = list(memory.tensors)  # contiguous: RegisteredMemory checks it
        device = memory.device
        self._mem_type = "DRAM" if device.type == "cpu" else "VRAM"
        self._device_id = 0 if device.type == "cpu" else device.index or 0
        self._registered = self._agent.register_memory(self._tensors)
        self._addresses = np.array([t.data_ptr() for t in self._tensors], dtype=np.uint64)
        self._block_bytes = np.array([region.geometry.block_bytes for _, region in memory.tensor_blocks()],
                                     dtype=np.uint64)
        self._metadata = pack_metadata(NixlPeerInfo(
            self._mem_type, self._device_id, tuple(int(a) for a in self._addresses),
            tuple(int(b) for b in self._block_bytes), self._agent.get_agent_metadata()))
        self._remotes: dict[str, _Remote] = {}
        self._notif_lock = threading.Lock()

    def descriptor(self) -> PeerDescriptor:
        return PeerDescriptor(self.worker_id, self.epoch, self.backend, self._metadata, self.layout)

    # -- sending ----------------------------------------------------------------------
    def _handshake(self, peer: PeerDescriptor, timeout: float) -> None:
        info = unpack_metadata(peer.metadata)
        mine = tuple(int(b) for b in self._block_bytes)
        if info.block_bytes != mine:
            raise TransferError(f"peer {peer.worker_id!r} describes {len(info.addresses)} tensors with blocks of "
                                f"{list(info.block_bytes)} bytes, expected {len(mine)} with {list(mine)}")
        expected = f"{peer.worker_id}-{peer.epoch}"
        try:  # NIXL/UCX creates the endpoint here: a peer that is already gone fails now
            name = self._agent.add_remote_agent(info.agent_metadata)
        except Exception as exc:
            raise TransferError(f"could not load the NIXL metadata of {peer.worker_id!r} (epoch "
                                f"{peer.epoch}): {type(exc).__name__}: {exc}") from exc
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name != expected:
            self._agent.remove_remote_agent(name)
            raise TransferError(f"nixl metadata of {peer.worker_id!r} names agent {name!r}, expected {expected!r}")
        self._remotes[peer.worker_id] = _Remote(name, info, np.array(info.addresses, dtype=np.uint64))

    def _drop_peer(self, peer: PeerDescriptor) -> None:
        remote = self._remotes.pop(peer.worker_id, None)
        if remote is not None:
            try:
                self._agent.remove_remote_agent(remote.agent_name)
            except Exception:
                pass  # already gone (e.g. it disconnected)

    def _write(self, peer: PeerDescriptor, transfer_id: str, src: list[int], dst: list[int],
               nbytes: int, deadline: float) -> Optional[str]:
        remote = self._remotes.get(peer.worker_id)
        if remote is None:
            return "not connected"
        agent = self._agent
        message = f"{nbytes} {transfer_id} {notif_mac(self._auth_key, remote.agent_name, nbytes, transfer_id)}".encode()
        if not src:
            agent.send_notif(remote.agent_name, message)
            return None
        local, far = self._descriptors(remote, src, dst)
        handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs(local, self._mem_type),
                                       agent.get_xfer_descs(far, remote.info.mem_type), remote.agent_name, message)
        try:
            state = agent.transfer(handle)
            pause = 1e-5
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 2e-3)
                state = agent.check_xfer_state(handle)
            if state == "DONE":
                return None
            if state == "ERR":
                return "NIXL reported a transfer error (peer gone or memory invalid)"
            return "timed out waiting for the NIXL WRITE to complete"
        finally:
            try:
                agent.release_xfer_handle(handle)
            except Exception:
                pass  # NIXL keeps a handle it could not cancel and frees it with the agent

    def _descriptors(self, remote: _Remote, src: list[int], dst: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Nx3 (address, length, device) rows for every tensor x run, local and remote."""
        s0, d0, count = coalesce(src, dst)
        bb = self._block_bytes[:, None]  # the peer's are the same (checked at handshake)
        lengths = (bb * count.astype(np.uint64)[None, :]).ravel()
        local = np.empty((len(lengths), 3), dtype=np.uint64)
        far = np.empty_like(local)
        local[:, 0] = (self._addresses[:, None] + s0.astype(np.uint64)[None, :] * bb).ravel()
        far[:, 0] = (remote.addresses[:, None] + d0.astype(np.uint64)[None, :] * bb).ravel()
        local[:, 1] = far[:, 1] = lengths
        local[:, 2] = self._device_id
        far[:, 2] = remote.info.device_id
        return local, far

    # -- receiving --------------------------------------------------------------------
    def _poll_interval(self) -> float:
        return 0.002

    def _poll(self) -> None:
        agent = self._agent
        if agent is None:
            return
        with self._notif_lock:
            notifs = agent.get_new_notifs()
        for messages in notifs.values():
            for raw in messages:
                nbytes, _, rest = bytes(raw).decode(errors="replace").partition(" ")
                transfer_id, _, presented = rest.rpartition(" ")
                expected = notif_mac(self._auth_key, self.agent_name, int(nbytes), transfer_id) if nbytes.isdigit() else ""
                if expected and hmac.compare_digest(presented.encode(), expected.encode()):
                    self._landed(transfer_id, int(nbytes))
                else:
                    self._refusals.note_refused("nixl notification")

    def _close(self) -> None:
        try:
            self._agent.deregister_memory(self._registered)
        except Exception:
            pass
        self._remotes.clear()
        self._agent = None  # destroys the agent (and its UCX worker) once unreferenced

"""The `nccl` transfer backend: KV blocks over torch.distributed point-to-point, one group per peer pair.

Owns the data path for a prefill and a decode whose memories are on different GPUs (NCCL:
NVLink or PCIe on one host, the network across hosts), or in host memory (gloo, which is how
the CPU suite runs it). The control plane is the tcp backend's, by subclassing as cuda_ipc.py
does: the authenticated zmq handshake, epochs, the data notification, the hand-off fence.
What changes is how the bytes move: the sender packs the source blocks of every registered
tensor into contiguous chunks (packing.py) and `send`s them on the pair's process group; the
receiver `recv`s each chunk into a staging buffer and scatters it into the destination blocks
under the same lock as `forget`, so a write the receiver gave up on never lands (as on tcp).
The group is built lazily at the handshake (nccl_group.py: a TCPStore on a port the OS picks,
random key prefix, NCCL for CUDA memory and gloo for host memory), warmed up with one small
message, and dropped on any failure.

Wire protocol on top of tcp's (every message authenticated by the session, peer_auth.py):
  hello reply: [..., TransferPeer bytes, JSON {"group_backend", "device"}]   (device: GPU UUID)
  group:       [b"group", JSON {"group_id", "source", "backend", "timeout_s"}] -> [b"ok", JSON {"port"}]
               (the receiver opened the store and joins the group as rank 1 in a thread of its own)
  group_ready: [b"group_ready", JSON {"group_id", "nonce", "timeout_s"}] -> [b"ok"]
               (after the sender's warm-up send of `nonce`, which the receiver checks)
  data:        [b"data", JSON header {"transfer_id", "target_epoch", "source", "dst", "nccl": true,
               "nbytes", "group", "chunk_blocks", "timeout_s"}] -> [b"ok"] (accepted)
               | [b"regroup", message] (no such group, or it broke: the sender handshakes anew)
               | [b"error", message] (fenced, stale epoch, malformed)
  then the blocks on the group: chunk k = `dst[k * chunk_blocks:(k + 1) * chunk_blocks]`, one
  `send` each (tag k), then
  commit:      [b"commit", JSON {"transfer_id", "timeout_s"}] -> [b"ok"] once the bytes are in the
               receiver's blocks | [b"error", message]
A write to a peer holds the pair's lock from announcement to commit, so sends and receives pair
up in order. Failure: a killed peer closes gloo's sockets and the pending operation fails within
milliseconds; a hung one fails at the write's deadline; either way both sides drop the group.
The receiver marks the transfer FAILED at once, so a decode waiting for it does not sit out
its whole timeout. KV is sent per request, after the prompt's prefill: the prefill engine has
no per-layer hook to stream from (docs/transfer_nccl.md).
"""
from __future__ import annotations

import contextlib
import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from baton.services.transfer import nccl_group
from baton.services.transfer.descriptor import LayoutMismatch, PeerDescriptor, TransferError
from baton.services.transfer.memory import RegisteredMemory
from baton.services.transfer.nccl_group import (PeerGroup, abort_group, build_group, receive_chunks, send_chunks,
                                                wait_work)
from baton.services.transfer.packing import pack_blocks, unpack_blocks
from baton.services.transfer.tcp import TcpTransferEngine

COMMIT_WAIT_CAP_S = 30.0
"""Longest the receiver's serve thread waits, in a commit, for bytes the sender says it sent."""
RECEIVE_SLACK_S = 1.0
"""A posted receive fails this long after the sender's own deadline (the sender gives up first)."""
STALE_S = 60.0
"""Finished receives nobody committed are forgotten after this."""
CHUNK_BYTES = 64 << 20
"""Default most bytes per message: a request goes as several messages, so a hand-off needs two
or three chunks of staging on each side, never the whole request's size, and packing, the wire
and scattering overlap."""
MAX_CHUNK_BYTES = 1 << 30
"""Largest chunk a receiver accepts (what one staging buffer may take)."""
NCCL_SETUP_S = 30.0
"""Least time an NCCL group gets to set up once the receiver answered the hello (the first
communicator of a process takes seconds); a receiver that does not answer still fails at the
handshake's own timeout."""


@dataclass
class _Receive:
    """A write the receiver accepted: its receive is posted, its bytes not yet in the blocks."""

    transfer_id: str
    dst: list[int]
    nbytes: int
    deadline: float
    chunk_blocks: int
    """Blocks per message (the sender's choice, announced)."""
    error: Optional[str] = None
    done: threading.Event = field(default_factory=threading.Event)
    done_at: float = 0.0


class NcclTransferEngine(TcpTransferEngine):
    """Transfer engine over torch.distributed send / recv (NCCL for CUDA memory, gloo for host memory)."""

    backend = "nccl"

    def __init__(self, worker_id: str, memory: RegisteredMemory, group_backend: str = "auto",
                 chunk_bytes: int = CHUNK_BYTES, **options) -> None:
        """`group_backend`: "auto" (NCCL for CUDA memory, gloo for host memory), "gloo" (CUDA memory
        staged through the host) or "nccl". `chunk_bytes`: most bytes of one message (whole blocks,
        at least one). `options`: the tcp backend's (host, port, auth_key, ...)."""
        self.group_kind = nccl_group.group_backend(memory.device, group_backend)
        self.chunk_blocks = max(1, chunk_bytes // memory.layout.bytes_per_block)
        """Blocks per message this engine sends."""
        self._comm_device = memory.device if self.group_kind == "nccl" else torch.device("cpu")
        self._gpu = nccl_group.device_identity(memory.device) if self.group_kind == "nccl" else ""
        self._bind_host = options.get("host", "127.0.0.1")
        self._stream = torch.cuda.Stream(memory.device) if memory.device.type == "cuda" else None
        self._groups_lock = threading.Lock()
        self._out: dict[str, PeerGroup] = {}
        """Sender side: the group to each peer, by worker id."""
        self._in: dict[str, PeerGroup] = {}
        """Receiver side: groups by group id (one live group per sender)."""
        self._queues: dict[str, queue.Queue] = {}
        self._threads: dict[str, threading.Thread] = {}
        """Receiver side: each group's completion thread (joined at close: a group must not be
        destroyed by a thread the interpreter is tearing down, which aborts the process)."""
        self._retired: list[threading.Thread] = []
        """Completion threads of replaced groups (they end on their own; joined at close too)."""
        self._receives: dict[str, _Receive] = {}
        super().__init__(worker_id, memory, **options)
        self._host = self.endpoint.split("://", 1)[1].rsplit(":", 1)[0]
        """The address peers reach this engine at (gloo's connections and the store use it too)."""
        self._joins = nccl_group.GroupJoins(self.group_kind, self._comm_device, self._host, self._bind_host,
                                            self._on_device)

    def connect(self, peer: PeerDescriptor, timeout: float = 5.0) -> None:
        try:
            super().connect(peer, timeout)
        except LayoutMismatch as exc:
            if "num_kv_heads" not in str(exc):
                raise
            raise LayoutMismatch(f"{exc} (a different tensor-parallel size on each side? the nccl backend moves "
                                 "each worker's KV heads as they are, it does not re-slice them)") from None

    # -- handshake (sender side) ---------------------------------------------------------
    def _hello_extra(self) -> list[bytes]:
        return [json.dumps({"group_backend": self.group_kind, "device": self._gpu}).encode()]

    def _accept_peer(self, peer: PeerDescriptor, extra: list[bytes]) -> None:
        info = json.loads(bytes(extra[0])) if extra else {}
        theirs = info.get("group_backend")
        if theirs != self.group_kind:
            raise TransferError(f"peer {peer.worker_id!r} moves blocks over {theirs or 'nothing'}, this engine over "
                                f"{self.group_kind}: both KV caches must be on GPUs (NCCL) or both in host memory (gloo)")
        if self._gpu and info.get("device") == self._gpu:
            raise TransferError(f"peer {peer.worker_id!r} is on this engine's GPU ({self._gpu}): NCCL cannot connect "
                                "two processes on one GPU; use --transfer cuda_ipc there")

    def _handshake(self, peer: PeerDescriptor, timeout: float) -> None:
        deadline = time.monotonic() + (max(timeout, NCCL_SETUP_S) if self.group_kind == "nccl" else timeout)
        super()._handshake(peer, timeout)
        try:
            group = self._open_group(peer, deadline)
        except BaseException:
            super()._drop_peer(peer)
            raise
        with self._groups_lock:
            old = self._out.pop(peer.worker_id, None)
            self._out[peer.worker_id] = group
        if old is not None:
            abort_group(old, "replaced by a new handshake")

    def _open_group(self, peer: PeerDescriptor, deadline: float) -> PeerGroup:
        with self._links_lock:
            link = self._links[peer.worker_id]
        group_id, nonce = secrets.token_hex(16), secrets.randbits(62)
        group: Optional[PeerGroup] = None
        try:
            kind, body = link.request(b"group", [json.dumps({
                "group_id": group_id, "source": self.worker_id, "backend": self.group_kind,
                "timeout_s": deadline - time.monotonic()}).encode()], deadline)
            if kind != b"ok":
                raise TransferError(f"peer {peer.worker_id!r} refused a process group: {_text(body)}")
            port = int(json.loads(bytes(body[0]))["port"])
            host = peer.metadata.decode().split("://", 1)[1].rsplit(":", 1)[0]
            store = nccl_group.join_store(host, port, deadline - time.monotonic())
            group = PeerGroup(group_id, self.group_kind, 0, build_group(store, group_id, 0, self.group_kind, self._host),
                              store, self._comm_device, peer.worker_id)
            with self._on_device():
                work = group.pg.send([torch.tensor([nonce], dtype=torch.int64, device=self._comm_device)], 1, 0)
                error = wait_work(work, group.backend, deadline)
            if error is not None:
                abort_group(group, error)
                raise TransferError(f"warm-up message to {peer.worker_id!r} failed: {error}")
            kind, body = link.request(b"group_ready", [json.dumps({
                "group_id": group_id, "nonce": nonce, "timeout_s": deadline - time.monotonic()}).encode()], deadline)
        except (TimeoutError, RuntimeError) as exc:  # zmq deadline, store or group set-up
            if group is not None:
                abort_group(group, str(exc))
            if isinstance(exc, TransferError):
                raise
            raise TransferError(f"process group with {peer.worker_id!r} not set up: {exc}") from exc
        if kind != b"ok":
            abort_group(group, "refused")
            raise TransferError(f"peer {peer.worker_id!r} did not take the process group: {_text(body)}")
        return group

    def _drop_peer(self, peer: PeerDescriptor) -> None:
        with self._groups_lock:
            group = self._out.pop(peer.worker_id, None)
        if group is not None:
            abort_group(group, "peer dropped")
        super()._drop_peer(peer)

    def _forget_peer(self, peer: PeerDescriptor, group: Optional[PeerGroup] = None) -> None:
        """Make the next `connect` handshake anew (the group or the session is gone), unless a
        handshake already replaced `group` (taken with `connect`'s lock: never half of a new one)."""
        with self._connect_lock:
            with self._groups_lock:
                if group is not None and self._out.get(peer.worker_id) is not group:
                    return
            with self._peers_lock:
                self._peers.pop(peer.worker_id, None)
            self._drop_peer(peer)

    # -- data path (sender side) ---------------------------------------------------------
    def _write(self, peer: PeerDescriptor, transfer_id: str, src: list[int], dst: list[int],
               nbytes: int, deadline: float) -> Optional[str]:
        with self._links_lock:
            link = self._links.get(peer.worker_id)
        with self._groups_lock:
            group = self._out.get(peer.worker_id)
        if link is None or group is None:
            self._forget_peer(peer)
            return "not connected (the next connect handshakes anew)"
        if group.broken is not None:
            self._forget_peer(peer, group)
            return f"the process group with this peer broke ({group.broken}); reconnect"
        if not group.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return "another write to this peer held its process group until the deadline"
        try:
            header = {"transfer_id": transfer_id, "target_epoch": peer.epoch, "source": self.worker_id, "dst": dst,
                      "nccl": True, "nbytes": nbytes, "group": group.group_id, "chunk_blocks": self.chunk_blocks,
                      "timeout_s": deadline - time.monotonic()}
            try:
                kind, body = link.request(b"data", [json.dumps(header).encode()], deadline)
            except (TimeoutError, TransferError) as exc:  # the receive may be posted: the group is out of step
                self._forget_peer(peer, group)
                return str(exc)
            if kind != b"ok":  # refused before anything was posted (fenced, stale, malformed), or no group
                if kind in (b"unauthenticated", b"regroup"):
                    self._forget_peer(peer, group)
                return _text(body) or f"peer replied {kind!r}"
            error = self._send_and_commit(link, group, transfer_id, src, deadline)
            if error is not None:  # whatever failed past the announcement, this group is not trusted again
                abort_group(group, error)
                self._forget_peer(peer, group)
            return error
        finally:
            group.lock.release()

    def _send_and_commit(self, link, group: PeerGroup, transfer_id: str, src: list[int],
                         deadline: float) -> Optional[str]:
        """The blocks over the group, then the commit; None once they are in the receiver's blocks."""
        error = None
        try:
            with self._on_device():
                error = send_chunks(group, lambda ids: pack_blocks(self.memory, ids, group.device), src,
                                    self.chunk_blocks, deadline)
        except RuntimeError as exc:
            error = str(exc)
        if error is not None:
            return f"sending the blocks over {group.backend} failed: {error}"
        try:
            kind, body = link.request(b"commit", [json.dumps({
                "transfer_id": transfer_id, "timeout_s": deadline - time.monotonic()}).encode()], deadline)
        except (TimeoutError, TransferError) as exc:
            return str(exc)
        return None if kind == b"ok" else (_text(body) or f"peer replied {kind!r}")

    @contextlib.contextmanager
    def _on_device(self):
        """This engine's GPU and transfer stream current (nothing on the CPU)."""
        if self._stream is None:
            yield
            return
        with torch.cuda.device(self.memory.device), torch.cuda.stream(self._stream):
            yield

    # -- receiving ---------------------------------------------------------------------
    def _handle(self, kind: bytes, body: list) -> list[bytes]:
        if kind in (b"group", b"group_ready", b"commit"):
            header = json.loads(body[0].bytes) if body else {}
            return {b"group": self._group_request, b"group_ready": self._group_ready,
                    b"commit": self._commit}[kind](header)
        return super()._handle(kind, body)

    def _group_request(self, header: dict) -> list[bytes]:
        if header.get("backend") != self.group_kind:
            return [b"error", f"this engine moves blocks over {self.group_kind}, not {header.get('backend')}".encode()]
        port = self._joins.start(str(header["group_id"]), str(header.get("source", "")),
                                 float(header.get("timeout_s", 5.0)))
        return [b"ok", json.dumps({"port": port}).encode()]

    def _group_ready(self, header: dict) -> list[bytes]:
        try:
            group = self._joins.claim(str(header.get("group_id")), header.get("nonce"),
                                      float(header.get("timeout_s", 0.0)))
        except ValueError as exc:
            return [b"error", str(exc).encode()]
        q: queue.Queue = queue.Queue()
        with self._groups_lock:
            stale = [g for g in self._in.values() if g.peer == group.peer]
            self._retired = [t for t in self._retired if t.is_alive()]
            for old in stale:  # one live group per sender: a re-handshake replaces the old one
                self._in.pop(old.group_id, None)
                self._retired.append(self._threads.pop(old.group_id))
                self._queues.pop(old.group_id).put(None)
            thread = threading.Thread(target=self._complete, args=(group, q), daemon=True,
                                      name=f"baton-nccl-rx-{self.worker_id}")
            self._in[group.group_id], self._queues[group.group_id] = group, q
            self._threads[group.group_id] = thread
        for old in stale:
            abort_group(old, "replaced by a new handshake")
        thread.start()
        return [b"ok"]

    def _receive_data(self, header: dict, payload: list) -> list[bytes]:
        transfer_id = str(header["transfer_id"])
        if header.get("target_epoch") != self.epoch:
            return [b"error", (f"stale epoch: sender targets {self.worker_id!r} epoch {header.get('target_epoch')},"
                               f" this engine is epoch {self.epoch} (peer restarted; reconnect)").encode()]
        with self._groups_lock:
            group = self._in.get(str(header.get("group")))
            q = self._queues.get(str(header.get("group")))
        if group is None or q is None or group.broken is not None:
            why = group.broken if group is not None else "unknown"
            return [b"regroup", f"no usable process group with this sender ({why}): reconnect".encode()]
        dst = [int(d) for d in header.get("dst", [])]
        nbytes = len(dst) * self.bytes_per_block
        error = None
        if not header.get("nccl") or payload:
            error = "malformed message: an nccl engine takes only announced, separately sent blocks"
        elif any(not 0 <= d < self.layout.num_blocks for d in dst):
            error = f"destination blocks out of range (this engine has {self.layout.num_blocks})"
        elif int(header.get("nbytes", -1)) != nbytes:
            error = f"announcement says {header.get('nbytes')} bytes for {len(dst)} blocks"
        elif not 1 <= int(header.get("chunk_blocks", 0)) <= max(1, MAX_CHUNK_BYTES // self.bytes_per_block):
            error = f"chunks of {header.get('chunk_blocks')} blocks: more than {MAX_CHUNK_BYTES} bytes or none"
        if error is not None:
            self._landed(transfer_id, 0, error)
            return [b"error", error.encode()]
        self._purge()
        receive = _Receive(transfer_id, dst, nbytes, time.monotonic() + float(header.get("timeout_s", 0.0))
                           + RECEIVE_SLACK_S, int(header["chunk_blocks"]))
        with self._inbound_cond:
            if self._fenced_off(transfer_id):
                return [b"error", f"transfer {transfer_id!r} was given up by the receiver: not written".encode()]
            if transfer_id in self._receives:
                return [b"error", f"transfer {transfer_id!r} is already being received".encode()]
            self._receives[transfer_id] = receive
        q.put(receive)
        return [b"ok"]

    def _complete(self, group: PeerGroup, q: queue.Queue) -> None:
        """Finish the group's accepted writes in order: receive and scatter them, then land or fail."""
        if self._stream is not None:
            torch.cuda.set_device(self.memory.device)
        while (receive := q.get()) is not None:
            error = group.broken
            if error is None:
                with self._on_device():
                    error = self._receive_chunks(group, receive)
            with self._inbound_cond:
                if self._fenced_off(receive.transfer_id):
                    error = f"transfer {receive.transfer_id!r} was given up by the receiver: not written"
                else:
                    self._landed(receive.transfer_id, 0 if error else receive.nbytes, error)
                receive.error, receive.done_at = error, time.monotonic()
            receive.done.set()

    def _receive_chunks(self, group: PeerGroup, receive: _Receive) -> Optional[str]:
        """Receive a write and scatter each chunk under the fence lock, synchronized before the lock
        is released: once `forget` returns, no byte of the write lands. A write fenced midway is
        still received to its end (the sender sends it all) but lands no further."""
        fenced = False

        def land(ids: list[int], staging: torch.Tensor) -> None:
            nonlocal fenced
            with self._inbound_cond:  # `forget` takes it too
                fenced = fenced or self._fenced_off(receive.transfer_id)
                if not fenced:
                    unpack_blocks(self.memory, staging, ids)
                    if self._stream is not None:
                        self._stream.synchronize()  # in the blocks before the lock is released
        error = receive_chunks(group, receive.dst, receive.chunk_blocks, self.bytes_per_block, receive.deadline, land)
        if error is not None:
            return f"receiving the blocks from {group.peer!r} over {group.backend} failed: {error}"
        return f"transfer {receive.transfer_id!r} was given up by the receiver: not written" if fenced else None

    def _commit(self, header: dict) -> list[bytes]:
        transfer_id = str(header.get("transfer_id"))
        with self._inbound_cond:
            receive = self._receives.get(transfer_id)
        if receive is None:
            return [b"error", f"no write of {transfer_id!r} was announced here".encode()]
        if not receive.done.wait(max(0.0, min(float(header.get("timeout_s", 0.0)), COMMIT_WAIT_CAP_S))):
            return [b"error", f"the blocks of {transfer_id!r} did not arrive in time".encode()]
        with self._inbound_cond:
            self._receives.pop(transfer_id, None)
        return [b"ok"] if receive.error is None else [b"error", receive.error.encode()]

    def _purge(self) -> None:
        """Forget receives nobody committed (their sender died)."""
        now = time.monotonic()
        with self._inbound_cond:
            for tid in [t for t, r in self._receives.items() if r.done.is_set() and now - r.done_at > STALE_S]:
                del self._receives[tid]

    def _close(self) -> None:
        super()._close()
        with self._groups_lock:
            groups = [*self._out.values(), *self._in.values()]
            queues, threads = list(self._queues.values()), [*self._threads.values(), *self._retired]
            self._out.clear()
            self._in.clear()
            self._queues.clear()
            self._threads.clear()
            self._retired.clear()
        for q in queues:
            q.put(None)
        for thread in threads:
            thread.join(timeout=5.0)
        for group in groups:
            abort_group(group, "engine closed")
        groups.clear()  # the last references: the groups are destroyed here, by the closing thread


def _text(body: list) -> str:
    return bytes(body[0]).decode(errors="replace") if body else ""

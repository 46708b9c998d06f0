"""The transfer-engine interface: transfer states, handles, the engine contract.

Owns what every backend shares: `TransferState` (SGLang's names), `TransferHandle` (the result
of a write), the `TransferEngine` base class with the connect / write / received contract and
its bookkeeping. What an engine moves is a `RegisteredMemory` (memory.py); peer identity
(`PeerDescriptor`, epochs, layout checks, `TransferError` / `LayoutMismatch`) lives in
descriptor.py and is re-exported here; the factory is factory.py. Backends (tcp.py, nixl.py)
implement only the moving of bytes: `_handshake`, `_drop_peer`, `_write`, `_poll`, `_close`.

Semantics every backend keeps:
- `write` copies, for every registered tensor (every layer's K and V in the KV region), local
  block `src` into the peer's block `dst` for each (src, dst) pair, then notifies the peer
  with the transfer id. It never blocks past its timeout: a dead or stale peer yields FAILED
  with a message.
- A peer is identified by (worker_id, epoch). `connect` with the same epoch is a no-op;
  a new epoch (the peer restarted) drops the old connection and handshakes again, so a
  restarted peer is never written with stale addresses.
- The receiving side learns of a write through `received` / `wait_received`, which say
  SUCCESS only once every byte of that write is in this engine's registered memory.
"""
from __future__ import annotations

import enum
import secrets
import threading
from collections import OrderedDict
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

from baton.services.transfer.descriptor import (  # noqa: F401  (re-exported: the public names live here too)
    BACKENDS,
    LayoutMismatch,
    PeerDescriptor,
    TransferError,
    check_layout,
)
from baton.services.transfer.memory import MemoryLayout, RegisteredMemory


FENCE_LIMIT = 65536
"""Most given-up transfer ids a receiver remembers (oldest forgotten first)."""


class TransferState(enum.Enum):
    """Life of a transfer (SGLang's KVPoll names)."""

    BOOTSTRAPPING = "bootstrapping"
    WAITING_FOR_INPUT = "waiting_for_input"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"


@dataclass
class TransferHandle:
    """Outcome of one `write`."""

    transfer_id: str
    state: TransferState
    bytes: int = 0
    """Bytes moved (every registered tensor: K and V of all layers); 0 unless SUCCESS."""
    error: Optional[str] = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state is TransferState.SUCCESS


@dataclass
class _Inbound:
    state: TransferState
    bytes: int = 0
    error: Optional[str] = None
    when: float = field(default_factory=time.monotonic)


class TransferEngine(ABC):
    """Moves blocks of this worker's registered memory into peers' (and receives theirs)."""

    backend: str = ""

    def __init__(self, worker_id: str, memory: RegisteredMemory) -> None:
        if not isinstance(memory, RegisteredMemory):
            raise TypeError(f"a transfer engine registers a RegisteredMemory, not {type(memory).__name__} "
                            "(a worker converts its KV cache with baton.services.worker.kv_memory)")
        self.worker_id = worker_id
        self.memory = memory
        self.layout: MemoryLayout = memory.layout
        self.bytes_per_block = self.layout.bytes_per_block
        """Bytes one block id stands for (every registered tensor)."""
        self.epoch: int = secrets.randbits(63) or 1
        self.bytes_sent = 0
        self.bytes_received = 0
        self._peers: dict[str, PeerDescriptor] = {}
        self._peers_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._inbound: dict[str, _Inbound] = {}
        self._inbound_cond = threading.Condition()
        self._fenced: OrderedDict[str, None] = OrderedDict()
        """Transfer ids the receiver gave up on (`forget`): their late writes are refused (two-sided backends)."""
        self._closed = False

    # -- public API -------------------------------------------------------------------
    @abstractmethod
    def descriptor(self) -> PeerDescriptor:
        """What a peer needs to reach this engine (including the memory layout)."""

    def connect(self, peer: PeerDescriptor, timeout: float = 5.0) -> None:
        """Handshake with `peer` (no-op when already connected at the same epoch)."""
        self._check_open()
        if peer.backend != self.backend:
            raise TransferError(f"peer {peer.worker_id!r} speaks {peer.backend!r}, this engine {self.backend!r}")
        check_layout(self.layout, peer.layout, peer.worker_id)
        with self._connect_lock:  # handshakes one at a time; writes only wait for _peers_lock
            known = self.peer(peer.worker_id)
            if known is not None and known.epoch == peer.epoch:
                return
            if known is not None:  # the peer restarted: its old connection is stale
                with self._peers_lock:
                    self._peers.pop(peer.worker_id, None)
                self._drop_peer(known)
            self._handshake(peer, timeout)
            with self._peers_lock:
                self._peers[peer.worker_id] = peer

    def peer(self, worker_id: str) -> Optional[PeerDescriptor]:
        """The descriptor `connect` accepted for `worker_id`, if any."""
        with self._peers_lock:
            return self._peers.get(worker_id)

    def write(self, peer_worker_id: str, transfer_id: str, pairs: list[tuple[int, int]],
              timeout: float) -> TransferHandle:
        """Copy local block src of every registered tensor into the peer's block dst for each
        pair, then notify the peer with `transfer_id`. Returns SUCCESS or FAILED, never
        later than `timeout` seconds (plus scheduling noise)."""
        start = time.monotonic()
        peer = self.peer(peer_worker_id)
        if self._closed:
            return TransferHandle(transfer_id, TransferState.FAILED, error="transfer engine is closed")
        if peer is None:
            return TransferHandle(transfer_id, TransferState.FAILED,
                                  error=f"unknown peer {peer_worker_id!r}: call connect() first")
        src, dst = self._check_pairs(pairs, peer)
        nbytes = len(src) * self.bytes_per_block
        try:
            error = self._write(peer, transfer_id, src, dst, nbytes, start + max(0.0, timeout))
        except Exception as exc:  # a backend bug or error must not escape as a hang or crash
            error = f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - start
        if error is not None:
            return TransferHandle(transfer_id, TransferState.FAILED, error=f"write to {peer_worker_id!r} "
                                  f"(epoch {peer.epoch}) failed: {error}", elapsed_s=elapsed)
        with self._inbound_cond:
            self.bytes_sent += nbytes
        return TransferHandle(transfer_id, TransferState.SUCCESS, bytes=nbytes, elapsed_s=elapsed)

    def received(self, transfer_id: str) -> TransferState:
        """SUCCESS once the write `transfer_id` has fully landed here; WAITING_FOR_INPUT before
        (FAILED when the backend saw it arrive broken)."""
        self._poll()
        with self._inbound_cond:
            entry = self._inbound.get(transfer_id)
            return TransferState.WAITING_FOR_INPUT if entry is None else entry.state

    def wait_received(self, transfer_id: str, timeout: float) -> TransferState:
        """`received`, waiting up to `timeout` seconds for a final state.

        Polls fast at first (50 us, doubling up to `_poll_interval()`): a hand-off usually
        lands within a millisecond of the sender's success."""
        deadline = time.monotonic() + timeout
        interval = 5e-5
        while True:
            state = self.received(transfer_id)
            left = deadline - time.monotonic()
            if state in (TransferState.SUCCESS, TransferState.FAILED) or left <= 0:
                return state
            with self._inbound_cond:
                if transfer_id not in self._inbound:
                    self._inbound_cond.wait(min(left, interval))
            interval = min(interval * 2, self._poll_interval())

    def forget(self, transfer_id: str) -> None:
        """Drop the receive-side bookkeeping of `transfer_id` and fence it: a write of it that
        arrives later is refused instead of landing in blocks the caller may have freed and
        handed to another request. Once this returns, no write of it lands (tcp, nccl; the
        one-sided backends, nixl and cuda_ipc, write without the receiver's say)."""
        with self._inbound_cond:
            self._inbound.pop(transfer_id, None)
            self._fenced[transfer_id] = None
            self._fenced.move_to_end(transfer_id)
            while len(self._fenced) > FENCE_LIMIT:
                self._fenced.popitem(last=False)

    def _fenced_off(self, transfer_id: str) -> bool:
        """True when the receiver gave up on `transfer_id` (call with `_inbound_cond` held)."""
        return transfer_id in self._fenced

    def close(self) -> None:
        """Stop serving and release sockets / registrations. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._peers_lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for peer in peers:
            try:
                self._drop_peer(peer)
            except Exception:
                pass
        self._close()

    def __enter__(self) -> "TransferEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for backends -----------------------------------------------------------------
    def _landed(self, transfer_id: str, nbytes: int, error: Optional[str] = None) -> None:
        """Record that a write arrived (completely, or broken when `error`)."""
        with self._inbound_cond:
            if error is None:
                self.bytes_received += nbytes
                self._inbound[transfer_id] = _Inbound(TransferState.SUCCESS, nbytes)
            else:
                self._inbound[transfer_id] = _Inbound(TransferState.FAILED, 0, error)
            self._inbound_cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"transfer engine {self.worker_id!r} is closed")

    def _check_pairs(self, pairs, peer: PeerDescriptor) -> tuple[list[int], list[int]]:
        src = [int(s) for s, _ in pairs]
        dst = [int(d) for _, d in pairs]
        bad_src = [s for s in src if not 0 <= s < self.layout.num_blocks]
        bad_dst = [d for d in dst if not 0 <= d < peer.layout.num_blocks]
        if bad_src or bad_dst:
            raise ValueError(f"block ids out of range: src {bad_src} (local has {self.layout.num_blocks}),"
                             f" dst {bad_dst} (peer has {peer.layout.num_blocks})")
        if len(set(dst)) != len(dst):
            raise ValueError("duplicate destination blocks in pairs")
        return src, dst

    def _poll_interval(self) -> float:
        """How often `wait_received` re-polls a backend that has no push notification."""
        return 0.05

    def _poll(self) -> None:
        """Collect arrivals the backend has not pushed yet (NIXL notifications)."""

    @abstractmethod
    def _handshake(self, peer: PeerDescriptor, timeout: float) -> None:
        """Make `peer` writable (layout already checked); raise TransferError on failure."""

    @abstractmethod
    def _drop_peer(self, peer: PeerDescriptor) -> None:
        """Forget a peer's connection state (it closed or restarted)."""

    @abstractmethod
    def _write(self, peer: PeerDescriptor, transfer_id: str, src: list[int], dst: list[int],
               nbytes: int, deadline: float) -> Optional[str]:
        """Move the blocks and notify; return None on success or an error message. Must
        return by `deadline` (time.monotonic())."""

    @abstractmethod
    def _close(self) -> None:
        """Release backend resources."""


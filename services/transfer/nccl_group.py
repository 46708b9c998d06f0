"""The process group of one sender/receiver pair of the `nccl` transfer backend (nccl.py).

Owns how two transfer engines get a torch.distributed group of their own, and how a
point-to-point operation on it is waited for with a deadline:
- the rendezvous: a `TCPStore` the receiver opens on a port the OS picks (no fixed port), the
  sender joins it at the address it already dials for the zmq link; every key is under a random
  per-group prefix (`PrefixStore`) that only the authenticated link carries;
- the group: `ProcessGroupNCCL` for CUDA memory, `ProcessGroupGloo` for host memory (or when
  asked), built straight from the store as rank 0 (sender) or 1 (receiver) of a world of two.
  Not `init_process_group`: its default group is one per process, and a worker talks to many
  peers (and may hold a tensor-parallel group of its own), each pair gets an independent group;
  `new_group` would need that default group. The backend classes take a store, a rank and a
  size, which is all a pair needs (the tensor-parallel group, services/engine/parallel/group.py,
  is built the same way);
- chunked writes (`send_chunks` / `receive_chunks`): a request as messages of a bounded size,
  two in flight each way;
- deadlines: gloo's `Work.wait(timeout)` raises past it (and when the peer's socket closes: a
  killed peer fails in milliseconds); NCCL's wait does not block the host, so `wait_work` polls
  `is_completed` and, past the deadline, the caller aborts the group (`abort_group`:
  ncclCommAbort), since an NCCL operation cannot be cancelled. A group whose operation failed or
  timed out is never used again (its stream of matched sends and receives may be out of step);
  both sides drop it and the sender handshakes anew.
NCCL groups are built with `TORCH_NCCL_ASYNC_ERROR_HANDLING=2` (clean up, do not tear the
process down: a dead prefill must not kill its decode) unless the variable is set, and NVLink
multicast off (`NCCL_NVLS_ENABLE=0` unless set): nothing here creates multicast objects.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

GROUP_TIMEOUT_S = 600.0
"""Timeout the groups are built with (NCCL's watchdog acts past it). Every operation of this
backend has its own, shorter deadline and aborts the group itself before that."""

_ENV_LOCK = threading.Lock()


def group_backend(device: torch.device, requested: str = "auto") -> str:
    """"nccl" for CUDA memory, "gloo" for host memory; `requested` "gloo" forces gloo (CUDA
    memory is then staged through the host), "nccl" insists on NCCL."""
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"group_backend must be auto, gloo or nccl, not {requested!r}")
    if requested == "auto":
        requested = "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl":
        if device.type != "cuda":
            raise ValueError(f"NCCL moves CUDA memory only, this engine's memory is on {device}: use gloo")
        if not dist.is_nccl_available():
            raise ValueError("this torch has no NCCL (torch.distributed.is_nccl_available() is False)")
    elif not dist.is_gloo_available():
        raise ValueError("this torch has no gloo (torch.distributed.is_gloo_available() is False)")
    return requested


def device_identity(device: torch.device) -> str:
    """The physical GPU behind `device` (its UUID), so two processes can tell they share one
    (NCCL refuses two ranks on one GPU); "" for host memory."""
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def open_store(host: str, timeout: float) -> dist.TCPStore:
    """The receiver's rendezvous store on a free port of `host` (`store.port`)."""
    return dist.TCPStore(host, 0, 2, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=max(0.1, timeout)))


def join_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    """The sender's client of the receiver's store."""
    return dist.TCPStore(host, port, 2, is_master=False, timeout=datetime.timedelta(seconds=max(0.1, timeout)))


@dataclass
class PeerGroup:
    """One pair's group, as either side holds it."""

    group_id: str
    backend: str
    """"gloo" or "nccl"."""
    rank: int
    """0: the sender (prefill), 1: the receiver (decode)."""
    pg: Any
    store: Any
    """Kept alive with the group (the receiver's is the server)."""
    device: torch.device
    """Where the buffers its operations move live (CPU for gloo)."""
    peer: str
    """The other side's worker id."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Sender: held through a whole write, so sends and receives pair up in order."""
    broken: Optional[str] = None
    """Why the group may not be used any more (None while it is healthy)."""


def build_group(store: Any, prefix: str, rank: int, backend: str, host: str) -> Any:
    """Join the two-rank group under `prefix` of `store` (blocks until both ranks joined for gloo;
    NCCL connects at its first operation)."""
    prefixed = dist.PrefixStore(prefix, store)
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        opts.group_name = f"baton-kv-{prefix[:12]}"
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    opts.group_name = f"baton-kv-{prefix[:12]}"  # its logs and flight records name the pair
    with _ENV_LOCK:  # read by the constructor; restored so that other groups keep their own policy
        saved = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        if saved is None:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
        try:
            return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        finally:
            if saved is None:
                os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)


def wait_work(work: Any, backend: str, deadline: float) -> Optional[str]:
    """Wait for a send or receive until `deadline` (time.monotonic()); None when it completed,
    else why not (the group must then be dropped)."""
    try:
        if backend == "gloo":
            left = deadline - time.monotonic()
            if left <= 0:
                return "deadline passed before the operation could be waited for"
            work.wait(datetime.timedelta(seconds=left))
            return None
        interval = 5e-5
        while not work.is_completed():
            if time.monotonic() >= deadline:
                return "timed out (the peer sent or received nothing in time)"
            time.sleep(interval)
            interval = min(2 * interval, 1e-3)
        work.wait()  # orders the current stream after it; raises if it failed
        return None
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__


def send_chunks(group: PeerGroup, pack: Callable[[list[int]], torch.Tensor], src: list[int], step: int,
                deadline: float) -> Optional[str]:
    """Send `src` as chunks of `step` blocks (chunk k: tag k), each buffer made by `pack`, two sends
    in flight: chunk k + 1 is packed while chunk k is on the wire, and at most three chunks'
    buffers exist at once, however long the request. None once all completed, else why not."""
    in_flight: deque = deque()
    for index, start in enumerate(range(0, len(src), step)):
        if len(in_flight) >= 2 and (error := wait_work(in_flight.popleft()[0], group.backend, deadline)):
            return error
        packed = pack(src[start:start + step])
        in_flight.append((group.pg.send([packed], 1, index), packed))
    while in_flight:
        if error := wait_work(in_flight.popleft()[0], group.backend, deadline):
            return error
    return None


def receive_chunks(group: PeerGroup, dst: list[int], step: int, bytes_per_block: int, deadline: float,
                   land: Callable[[list[int], torch.Tensor], None]) -> Optional[str]:
    """Receive what `send_chunks` sends for `dst` (two receives posted ahead), handing each chunk's
    destination ids and staging buffer to `land` in order. None once all arrived, else why not
    (the group is then aborted)."""
    chunks = [dst[i:i + step] for i in range(0, len(dst), step)]
    in_flight: deque = deque()
    posted = 0
    try:
        while posted < len(chunks) or in_flight:
            while posted < len(chunks) and len(in_flight) < 2:
                staging = torch.empty(len(chunks[posted]) * bytes_per_block, dtype=torch.uint8, device=group.device)
                in_flight.append((chunks[posted], staging, group.pg.recv([staging], 0, posted)))
                posted += 1
            ids, staging, work = in_flight.popleft()
            error = wait_work(work, group.backend, deadline)
            if error is not None:
                abort_group(group, error)
                return error
            land(ids, staging)
    except RuntimeError as exc:
        abort_group(group, str(exc))
        return str(exc)
    return None


def abort_group(group: PeerGroup, why: str) -> None:
    """Mark `group` broken and abort whatever it still has in flight (NCCL: ncclCommAbort;
    gloo has nothing to abort: its pending operations fail as its sockets close)."""
    if group.broken is None:
        group.broken = why
    if group.backend == "nccl":
        try:
            group.pg.abort()
        except Exception:
            pass


@dataclass
class _Join:
    """A receiver-side group being joined, until the sender's group_ready claims it."""

    sender: str
    deadline: float
    group: Optional[PeerGroup] = None
    nonce: Optional[int] = None
    error: Optional[str] = None
    done: threading.Event = field(default_factory=threading.Event)


class GroupJoins:
    """The receiver's side of setting a group up: `start` opens the store and joins as rank 1 in a
    thread of its own (the gloo rendezvous blocks until the sender joins too), then receives the
    sender's warm-up nonce; `claim` hands the group over once the authenticated link named the same
    nonce. Joins nobody claims are forgotten after `STALE_S`."""

    STALE_S = 60.0

    def __init__(self, backend: str, device: torch.device, host: str, bind_host: str, on_device) -> None:
        self.backend, self.device, self.host, self.bind_host = backend, device, host, bind_host
        self.on_device = on_device
        """A context manager making the engine's GPU and stream current (a no-op on the CPU)."""
        self._joins: dict[str, _Join] = {}
        self._lock = threading.Lock()

    def start(self, group_id: str, sender: str, timeout: float) -> int:
        """Open the store, start joining; the store's port (for the sender)."""
        self.purge()
        timeout = min(timeout, GROUP_TIMEOUT_S)
        store = open_store(self.bind_host, timeout)
        join = _Join(sender, time.monotonic() + timeout)
        with self._lock:
            self._joins[group_id] = join
        threading.Thread(target=self._join, args=(group_id, store, join), daemon=True,
                         name=f"baton-nccl-join-{group_id[:8]}").start()
        return store.port

    def _join(self, group_id: str, store: Any, join: _Join) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            group = PeerGroup(group_id, self.backend, 1, build_group(store, group_id, 1, self.backend, self.host),
                              store, self.device, join.sender)
            with self.on_device():  # made on the stream NCCL's waits on, read after the receive
                nonce = torch.zeros(1, dtype=torch.int64, device=self.device)
                error = wait_work(group.pg.recv([nonce], 0, 0), self.backend, join.deadline)
                if error is None:
                    join.nonce = int(nonce.item())
            if error is not None:
                abort_group(group, error)
                raise RuntimeError(error)
            join.group = group
        except Exception as exc:
            join.error = f"{type(exc).__name__}: {exc}"
        finally:
            join.done.set()

    def claim(self, group_id: str, nonce: Any, timeout: float) -> PeerGroup:
        """The joined group, once its warm-up carried `nonce`; ValueError saying why not."""
        with self._lock:
            join = self._joins.pop(group_id, None)
        if join is None:
            raise ValueError("no such process group being set up")
        if not join.done.wait(max(0.0, min(timeout, join.deadline - time.monotonic()))):
            raise ValueError("the process group was not joined in time")
        if join.error is not None or join.group is None:
            raise ValueError(f"joining the process group failed: {join.error}")
        if join.nonce != nonce:
            abort_group(join.group, "warm-up mismatch")
            raise ValueError("the warm-up message did not come from the authenticated sender")
        return join.group

    def purge(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [g for g, j in self._joins.items() if now - j.deadline > self.STALE_S]
            joins = [self._joins.pop(g) for g in stale]
        for join in joins:
            if join.group is not None:
                abort_group(join.group, "never claimed")

"""The `tcp` transfer backend: blocks of registered memory over pyzmq, through host memory.

Owns one ROUTER socket per engine (bound on `host`, a random free port unless one is
given; descriptor metadata = the endpoint string, e.g. b"tcp://127.0.0.1:5555") served
by a background receiver thread, and one DEALER socket per peer for writing (each
guarded by a lock, since zmq sockets are not thread-safe). The portable fallback and
the easiest backend to debug.

Wire protocol (multipart messages, DEALER -> ROUTER; replies mirror the request id; every
request carries an auth frame after its request id, peer_auth.py says what it holds):
  challenge: [b"challenge", req_id, b"", client nonce] -> [b"ok", req_id, server nonce]
  hello:  [b"hello", req_id, b"", TransferPeer bytes of the sender, server nonce, hello MAC]
          -> [b"ok", req_id, TransferPeer bytes of the receiver, (subclass frames), welcome MAC]
           | [b"layout", req_id, message] | [b"error", req_id, message]
  data:   [b"data", req_id, auth frame, JSON header, T_0, T_1, ...]
          header = {"transfer_id", "target_epoch", "source", "dst": [block ids]}
          T_i = registered tensor i's blocks for `dst`, in order, as raw bytes (tensors in
          the memory's order: for the KV region K_0, V_0, K_1, V_1, ...)
          -> [b"ok", req_id] | [b"error", req_id, message]
A message whose auth frame does not verify is dropped (answered b"unauthenticated", which
also names this engine's epoch); the receiver socket refuses any frame larger than its
largest region (or `max_frame_bytes`): zmq disconnects that sender. A sender that still
holds a restarted peer's old descriptor has no session there ("stale epoch or unknown
session") and gets FAILED instead of writing blindly; it handshakes anew on its next connect.
A link whose request timed out is closed and reopened on next use, so late replies and
queued messages never leak into a later request.
"""
from __future__ import annotations

import hmac
import json
import os
import threading
import time
from typing import Optional

import torch
import zmq

from baton.services.transfer.base import TransferEngine
from baton.services.transfer.descriptor import LayoutMismatch, PeerDescriptor, TransferError, mismatch_message
from baton.services.transfer.memory import RegisteredMemory, layout_mismatches
from baton.services.transfer import peer_auth
from baton.services.transfer.peer_auth import ClientSession, SessionTable


class _Link:
    """A DEALER socket to one peer; every use holds `lock` (one thread at a time)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.lock = threading.Lock()
        self.sock: Optional[zmq.Socket] = None
        self.closed = False
        self.session: Optional[ClientSession] = None
        """Set once the handshake authenticated; every later request carries its auth frame."""

    def _reset(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def request(self, kind: bytes, frames: list, deadline: float) -> tuple[bytes, list[bytes]]:
        """Send one request and wait for its reply; TimeoutError past `deadline`."""
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"link to {self.endpoint} stayed busy until the deadline")
        try:
            if self.closed:
                raise TransferError(f"link to {self.endpoint} was closed")
            if self.sock is None:
                self.sock = self.ctx.socket(zmq.DEALER)
                self.sock.setsockopt(zmq.LINGER, 0)
                self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer not connected
                self.sock.connect(self.endpoint)
            req_id = os.urandom(8)
            if not self.sock.poll(_ms_left(deadline), zmq.POLLOUT):
                self._reset()
                raise TimeoutError(f"could not reach {self.endpoint}")
            first = bytes(frames[0]) if frames and self.session is not None else b""
            auth = self.session.auth_frame(kind, first) if self.session is not None else b""
            self.sock.send_multipart([kind, req_id, auth, *frames], copy=False)
            while True:
                if not self.sock.poll(_ms_left(deadline), zmq.POLLIN):
                    self._reset()
                    raise TimeoutError(f"no reply from {self.endpoint}")
                reply = self.sock.recv_multipart()
                if len(reply) >= 2 and reply[1] == req_id:
                    return reply[0], reply[2:]
        except BaseException:
            self._reset()
            raise
        finally:
            self.lock.release()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._reset()


def _ms_left(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))


class TcpTransferEngine(TransferEngine):
    """Transfer engine over pyzmq (host memory; device tensors are staged through the CPU)."""

    backend = "tcp"

    def __init__(self, worker_id: str, memory: RegisteredMemory, host: str = "127.0.0.1",
                 port: Optional[int] = None, advertise_host: Optional[str] = None,
                 poll_interval: float = 0.05, auth_key: bytes = b"", max_frame_bytes: int = 0) -> None:
        """Bind on `host` (`port`, or a random free one); peers are told `advertise_host`
        (default: `host`), which must be an address they can reach. `auth_key`: the key peers
        must prove (derived from the cluster secret; b"" for an open cluster). `max_frame_bytes`:
        largest frame accepted (0: the largest region, the most one write can carry)."""
        super().__init__(worker_id, memory)
        self._auth_key = auth_key
        self._sessions = SessionTable(auth_key)
        self.max_frame_bytes = max_frame_bytes or self._largest_frame()
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)  # zmq drops a sender of a bigger frame
        try:
            if port:
                self._router.bind(f"tcp://{host}:{port}")
            else:
                port = self._router.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError:
            self._router.close(linger=0)
            self._ctx.term()
            raise
        self.endpoint = f"tcp://{advertise_host or host}:{port}"
        self.port = port
        self._interval_ms = max(1, int(poll_interval * 1000))
        self._links: dict[str, _Link] = {}
        self._links_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"baton-tcp-rx-{worker_id}", daemon=True)
        self._thread.start()

    def descriptor(self) -> PeerDescriptor:
        return PeerDescriptor(self.worker_id, self.epoch, self.backend, self.endpoint.encode(), self.layout)

    def _largest_frame(self) -> int:
        """The largest frame a legitimate peer sends: one tensor's every block (or a header
        naming every block), whichever is bigger."""
        tensors = self.memory.tensor_blocks()
        largest = max((region.geometry.num_blocks * region.geometry.block_bytes for _, region in tensors), default=0)
        return max(largest, 16 * self.layout.num_blocks + 65536)

    # -- sending ----------------------------------------------------------------------
    def _handshake(self, peer: PeerDescriptor, timeout: float) -> None:
        endpoint = peer.metadata.decode()
        link = _Link(self._ctx, endpoint)
        deadline = time.monotonic() + timeout
        mine = self.descriptor().to_bytes()
        client_nonce = peer_auth.new_nonce()
        try:
            kind, body = link.request(b"challenge", [client_nonce], deadline)
            if kind == b"ok" and body:
                server_nonce = body[0]
                proof = peer_auth.hello_mac(self._auth_key, server_nonce, client_nonce, peer.epoch, mine)
                kind, body = link.request(b"hello", [mine, server_nonce, proof], deadline)
        except TimeoutError as exc:
            link.close()
            raise TransferError(f"handshake with {peer.worker_id!r} at {endpoint} timed out: {exc}") from exc
        if kind != b"ok" or len(body) < 2:
            link.close()
            message = body[0].decode(errors="replace") if body else "no message"
            raise (LayoutMismatch if kind == b"layout" else TransferError)(message)
        welcome, body = body[-1], body[:-1]
        if not hmac.compare_digest(
                welcome, peer_auth.welcome_mac(self._auth_key, server_nonce, client_nonce, body[0])):
            link.close()
            raise TransferError(f"{endpoint} did not prove this cluster's secret: refusing to write to it")
        link.session = ClientSession(server_nonce, peer_auth.session_key(self._auth_key, server_nonce, client_nonce))
        there = PeerDescriptor.from_bytes(body[0])
        if there.worker_id != peer.worker_id or there.epoch != peer.epoch:
            link.close()
            raise TransferError(
                f"stale descriptor: {endpoint} is served by {there.worker_id!r} epoch {there.epoch}, "
                f"descriptor says {peer.worker_id!r} epoch {peer.epoch}")
        try:
            self._accept_peer(peer, body[1:])
        except BaseException:
            link.close()
            raise
        with self._links_lock:
            self._links[peer.worker_id] = link

    def _hello_extra(self) -> list[bytes]:
        """Frames after the descriptor in this engine's hello reply (a subclass's hook)."""
        return []

    def _accept_peer(self, peer: PeerDescriptor, extra: list[bytes]) -> None:
        """Take the frames after the descriptor in the peer's hello reply (a subclass's hook)."""

    def _drop_peer(self, peer: PeerDescriptor) -> None:
        with self._links_lock:
            link = self._links.pop(peer.worker_id, None)
        if link is not None:
            link.close()

    def _write(self, peer: PeerDescriptor, transfer_id: str, src: list[int], dst: list[int],
               nbytes: int, deadline: float) -> Optional[str]:
        with self._links_lock:
            link = self._links.get(peer.worker_id)
        if link is None:
            return "not connected"
        frames = self._gather(src)
        header = json.dumps({"transfer_id": transfer_id, "target_epoch": peer.epoch,
                             "source": self.worker_id, "dst": dst}).encode()
        try:
            kind, body = link.request(b"data", [header, *frames], deadline)
        except (TimeoutError, TransferError) as exc:
            return str(exc)
        if kind == b"unauthenticated":  # the receiver lost our session (or restarted): handshake anew next time
            with self._peers_lock:
                self._peers.pop(peer.worker_id, None)
            self._drop_peer(peer)
        if kind != b"ok":
            return body[0].decode() if body else f"peer replied {kind!r}"
        return None

    def _gather(self, src: list[int]) -> list:
        """One contiguous host buffer per registered tensor holding the `src` blocks in order."""
        idx = torch.tensor(src, dtype=torch.long, device=self.memory.device)
        frames = []
        for blocks, _ in self.memory.tensor_blocks():
            buf = blocks.index_select(0, idx)
            if buf.device.type != "cpu":
                buf = buf.cpu()
            frames.append(buf.view(torch.uint8).numpy())  # zero-copy: zmq keeps a reference
        return frames

    # -- receiving --------------------------------------------------------------------
    def _serve(self) -> None:
        router = self._router
        try:
            while not self._stop.is_set():
                if not router.poll(self._interval_ms, zmq.POLLIN):
                    continue
                frames = router.recv_multipart(copy=False)
                if len(frames) < 4:
                    continue
                ident, kind, req_id, auth = frames[0].bytes, frames[1].bytes, frames[2].bytes, frames[3].bytes
                try:
                    reply = self._authenticated(kind, auth, frames[4:])
                except Exception as exc:  # never let one bad message kill the receiver
                    reply = [b"error", f"receiver error: {type(exc).__name__}: {exc}".encode()]
                router.send_multipart([ident, reply[0], req_id, *reply[1:]])
        finally:
            router.close(linger=0)

    def _authenticated(self, kind: bytes, auth: bytes, body: list) -> list[bytes]:
        """Run the handshake steps, and `_handle` for messages of an authenticated session."""
        sessions = self._sessions
        if kind == b"challenge":
            nonce = sessions.challenge(body[0].bytes) if body else None
            return [b"ok", nonce] if nonce is not None else [b"error", b"malformed challenge"]
        if kind == b"hello":
            if len(body) != 3:
                return [b"error", b"malformed hello"]
            descriptor, server_nonce, proof = (f.bytes for f in body)
            client_nonce = sessions.hello(server_nonce, proof, self.epoch, descriptor, "peer")
            if client_nonce is None:
                sessions.note_refused("hello")
                return [b"error", (f"authentication failed: the sender does not hold the cluster secret of "
                                   f"{self.worker_id!r} (or targets another epoch than {self.epoch})").encode()]
            reply = self._hello(descriptor)
            if reply[0] == b"ok":
                reply.append(peer_auth.welcome_mac(self._auth_key, server_nonce, client_nonce, reply[1]))
            return reply
        if sessions.verify(auth, kind, body[0].bytes if body else b"") is None:
            sessions.note_refused(f"{kind[:16]!r} message")
            return [b"unauthenticated", (f"stale epoch or unknown session: this engine is {self.worker_id!r} epoch "
                                         f"{self.epoch} (peer restarted, or not authenticated); reconnect").encode()]
        return self._handle(kind, body)

    def _hello(self, descriptor: bytes) -> list[bytes]:
        sender = PeerDescriptor.from_bytes(descriptor)
        diffs = layout_mismatches(sender.layout, self.layout)  # "local" = the sender's
        if diffs:
            return [b"layout", mismatch_message(self.worker_id, diffs).encode()]
        return [b"ok", self.descriptor().to_bytes(), *self._hello_extra()]

    def _handle(self, kind: bytes, body: list) -> list[bytes]:
        if kind == b"data":
            return self._receive_data(json.loads(body[0].bytes), body[1:])
        return [b"error", f"unknown request kind {kind!r}".encode()]

    def _receive_data(self, header: dict, payload: list) -> list[bytes]:
        transfer_id = str(header["transfer_id"])
        if header.get("target_epoch") != self.epoch:
            return [b"error", (f"stale epoch: sender targets {self.worker_id!r} epoch {header.get('target_epoch')},"
                               f" this engine is epoch {self.epoch} (peer restarted; reconnect)").encode()]
        dst = [int(d) for d in header["dst"]]
        n, tensors = len(dst), self.memory.tensor_blocks()
        expected = [n * region.geometry.block_bytes for _, region in tensors]
        sizes = [len(f.buffer) for f in payload]
        error = None
        if sizes != expected:
            error = f"malformed payload: {len(payload)} frames of {sizes} bytes, expected {len(expected)} of {expected}"
        elif any(not 0 <= d < self.layout.num_blocks for d in dst):
            error = f"destination blocks out of range (this engine has {self.layout.num_blocks})"
        if error is not None:
            self._landed(transfer_id, 0, error)
            return [b"error", error.encode()]
        with self._inbound_cond:  # `forget` takes it too: once it returns, nothing of this id lands
            if self._fenced_off(transfer_id):
                return [b"error", f"transfer {transfer_id!r} was given up by the receiver: not written".encode()]
            if n:
                device = self.memory.device
                idx = torch.tensor(dst, dtype=torch.long, device=device)
                for frame, (blocks, _) in zip(payload, tensors):
                    # raw bytes (any dtype, fp8 included: index_copy_ has no float8 kernel on CPU)
                    staging = torch.frombuffer(frame.buffer, dtype=torch.uint8)
                    blocks.view(torch.uint8).index_copy_(0, idx, staging.view(n, -1).to(device))
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
            self._landed(transfer_id, sum(expected))
        return [b"ok"]

    def _close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        with self._links_lock:
            links = list(self._links.values())
            self._links.clear()
        for link in links:
            link.close()
        self._ctx.destroy(linger=0)

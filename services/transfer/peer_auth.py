"""Peer authentication of the KV transfer port: who may write into this worker's memory.

Owns the challenge-response that the tcp (and cuda_ipc) handshake runs, and the per-message
MACs of the session it opens; nixl.py uses `notif_mac` for its notifications. The key is
derived from the cluster secret (`baton.protos.cluster_auth.derive_key(secret, "kv transfer")`);
an open cluster has the empty key, with which the same protocol runs (anyone can compute its
MACs, so it authenticates nothing, exactly as before), and a peer holding a different key fails
the handshake with a clear error instead of writing.

The handshake (sender = the DEALER side, receiver = the engine whose memory is written):
  1. sender -> [challenge, client_nonce]        receiver -> [ok, server_nonce]
  2. sender -> [hello, descriptor, server_nonce, hello_mac]
       hello_mac = HMAC(key, "hello" | server_nonce | client_nonce | target epoch | descriptor)
     receiver checks the MAC (constant time) and that the target epoch is its own, then opens
     session `server_nonce` with key HMAC(key, "session" | server_nonce | client_nonce)
     -> [ok, its descriptor, ..., welcome_mac]
       welcome_mac = HMAC(key, "welcome" | server_nonce | client_nonce | its descriptor)
     so the sender also knows it writes to a cluster member, not an impostor at that address.
  3. every later message carries an auth frame: session id (16 bytes) | seq (8, big-endian,
     increasing) | HMAC(session key, kind | seq | first body frame) (32). The first body frame
     of a data message is its JSON header (transfer id, target epoch, destination blocks).
A message without a valid auth frame is dropped (and logged, at most once a second): it
never touches memory nor marks any transfer as arrived or failed. Payload bytes are covered by
their size checks, not by the MAC (see docs/security.md for what that leaves to the network).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

NONCE_BYTES = 16
MAC_BYTES = 32
AUTH_FRAME_BYTES = NONCE_BYTES + 8 + MAC_BYTES
MAX_PENDING = 1024
"""Challenges awaiting their hello; the oldest is forgotten beyond this."""
MAX_SESSIONS = 4096
"""Open sessions kept; the oldest is forgotten beyond this (its sender re-handshakes)."""
PENDING_TTL_S = 60.0
"""Seconds a challenge stays answerable."""


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts (so no two part lists collide)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    return h.digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def hello_mac(key: bytes, server_nonce: bytes, client_nonce: bytes, target_epoch: int, descriptor: bytes) -> bytes:
    return mac(key, b"hello", server_nonce, client_nonce, str(target_epoch).encode(), descriptor)


def welcome_mac(key: bytes, server_nonce: bytes, client_nonce: bytes, descriptor: bytes) -> bytes:
    return mac(key, b"welcome", server_nonce, client_nonce, descriptor)


def session_key(key: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return mac(key, b"session", server_nonce, client_nonce)


def notif_mac(key: bytes, agent_name: str, nbytes: int, transfer_id: str) -> str:
    """The MAC a nixl notification carries (bound to the receiving agent, so to its epoch)."""
    return mac(key, b"notif", agent_name.encode(), str(nbytes).encode(), transfer_id.encode()).hex()


@dataclass
class ClientSession:
    """The sender's side of an open session (one per link)."""

    session_id: bytes
    key: bytes
    seq: int = 0

    def auth_frame(self, kind: bytes, first: bytes) -> bytes:
        """The auth frame of the next message (advances the sequence number)."""
        self.seq += 1
        seq = struct.pack(">Q", self.seq)
        return self.session_id + seq + mac(self.key, kind, seq, first)


@dataclass
class _ServerSession:
    key: bytes
    peer: str
    last_seq: int = 0


class SessionTable:
    """The receiver's pending challenges and open sessions (thread-safe, bounded)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._pending: "OrderedDict[bytes, tuple[bytes, float]]" = OrderedDict()
        self._sessions: "OrderedDict[bytes, _ServerSession]" = OrderedDict()
        self._lock = threading.Lock()
        self._last_log = 0.0
        self.refused = 0
        """Messages dropped for failing authentication."""

    def challenge(self, client_nonce: bytes) -> Optional[bytes]:
        """A fresh server nonce for a challenge (None for a malformed one)."""
        if len(client_nonce) != NONCE_BYTES:
            return None
        nonce = new_nonce()
        with self._lock:
            self._pending[nonce] = (client_nonce, time.monotonic())
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        return nonce

    def hello(self, server_nonce: bytes, presented: bytes, epoch: int, descriptor: bytes,
              peer: str) -> Optional[bytes]:
        """Check a hello; on success open its session and return the client nonce (for the welcome MAC)."""
        with self._lock:
            pending = self._pending.pop(server_nonce, None)
        if pending is None or time.monotonic() - pending[1] > PENDING_TTL_S:
            return None
        client_nonce = pending[0]
        if not hmac.compare_digest(presented, hello_mac(self.key, server_nonce, client_nonce, epoch, descriptor)):
            return None
        with self._lock:
            self._sessions[server_nonce] = _ServerSession(session_key(self.key, server_nonce, client_nonce), peer)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return client_nonce

    def verify(self, auth: bytes, kind: bytes, first: bytes) -> Optional[str]:
        """The peer name when `auth` is a valid, fresh auth frame for this message; else None."""
        if len(auth) != AUTH_FRAME_BYTES:
            return None
        session_id, seq_bytes, presented = auth[:NONCE_BYTES], auth[NONCE_BYTES:NONCE_BYTES + 8], auth[-MAC_BYTES:]
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or not hmac.compare_digest(presented, mac(session.key, kind, seq_bytes, first)):
            return None
        seq = struct.unpack(">Q", seq_bytes)[0]
        with self._lock:
            if seq <= session.last_seq:  # a replayed message
                return None
            session.last_seq = seq
        return session.peer

    def note_refused(self, what: str) -> None:
        """Count (and log, at most once a second) a message dropped for failing authentication."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.warning("KV transfer port dropped an unauthenticated %s (%d dropped so far)", what, self.refused)

"""Child-process bodies for test_nccl.py (spawned: importable, no pytest state).

Memories are rebuilt from seeds (tests/unit/transfer/helpers.py), so each side knows the other's
contents without sending them. The faults are injected on the engine instance, in the child only.
"""
from __future__ import annotations

import os
import signal
import threading

BIG = dict(num_blocks=16, page_size=64, num_kv_heads=8, head_dim=128)
"""1 MiB per block id (K and V x 2 layers x 64 tokens x 8 heads x 128 x float32): a 16-block write
is larger than loopback's socket buffers, so it cannot complete while the receiver takes nothing."""


def engine(worker_id: str, seed: int):
    import torch

    torch.set_num_threads(1)
    from baton.services.transfer import create_transfer_engine
    from tests.unit.transfer.helpers import filled_memory, small_layout

    return create_transfer_engine("nccl", worker_id, filled_memory(small_layout(**BIG), seed=seed))


def receiver_main(conn, sender_seed: int, transfer_id: str, pairs) -> None:
    """Check one write lands exactly; then accept the next announcement, post nothing, and die 0.3 s later."""
    import torch

    from tests.unit.transfer.helpers import filled_memory, small_layout

    rx = engine("decode-nccl", seed=99)
    before = [t.clone() for t in rx.memory.tensors]
    conn.send(rx.descriptor().to_bytes())
    state = rx.wait_received(transfer_id, timeout=20.0)
    source, written, n = filled_memory(small_layout(**BIG), seed=sender_seed), {d: s for s, d in pairs}, BIG["num_blocks"]
    bad = [(i, b) for i, (want, got) in enumerate(zip(source.tensors, rx.memory.tensors, strict=True))
           for b in range(n) if not torch.equal(got.view(n, -1)[b], (want if b in written else before[i])
                                                .view(n, -1)[written.get(b, b)])]

    def accept_then_die(header, payload):
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return [b"ok"]
    rx._receive_data = accept_then_die  # the serve thread's next data message (instance attribute wins)
    conn.send({"state": state.name, "bytes_received": rx.bytes_received, "bad": bad})
    conn.recv()  # killed before this returns


def sender_main(conn, seed: int, pairs) -> None:
    """Connect, then announce a write and die before any of its bytes move."""
    from baton.services.transfer import PeerDescriptor

    tx = engine("prefill-nccl", seed=seed)
    peer = PeerDescriptor.from_bytes(conn.recv())
    tx.connect(peer, timeout=10.0)
    tx._send_and_commit = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    conn.send("connected")
    conn.recv()
    tx.write(peer.worker_id, "mp-dead", pairs, timeout=30.0)

"""Child-process bodies for test_multiprocess.py (spawned: importable, no pytest state).

Caches are rebuilt from seeds, so each side knows the other's contents without sending them.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # children may be started without the conftest


def _engine(backend: str, worker_id: str, seed: int):
    import torch

    torch.set_num_threads(1)
    from baton.services.transfer import create_transfer_engine
    from tests.unit.transfer.helpers import filled_memory, small_layout

    return create_transfer_engine(backend, worker_id, filled_memory(small_layout(), seed=seed))


def receiver_main(backend: str, conn, sender_seed: int, transfer_id: str, pairs) -> None:
    """Serve, hand the descriptor to the parent, then check what landed."""
    from tests.unit.transfer.helpers import filled_memory, small_layout

    engine = _engine(backend, "decode-mp", seed=99)
    before = [t.clone() for t in engine.memory.tensors]
    conn.send(engine.descriptor().to_bytes())
    state = engine.wait_received(transfer_id, timeout=20.0)
    source = filled_memory(small_layout(), seed=sender_seed)
    written = {d: s for s, d in pairs}
    n = engine.layout.num_blocks
    bad = []
    for i, (want_t, got_t) in enumerate(zip(source.tensors, engine.memory.tensors, strict=True)):
        for b in range(n):
            want = want_t.view(n, -1)[written[b]] if b in written else before[i].view(n, -1)[b]
            if not bool((got_t.view(n, -1)[b] == want).all()):
                bad.append((i, b))
    conn.send({"state": state.name, "bytes_received": engine.bytes_received, "bad": bad})
    conn.recv()  # stay alive until the parent says so (or kills us)
    engine.close()


def sender_main(backend: str, conn, seed: int) -> None:
    """Connect to the descriptor the parent sends, then write on request."""
    from baton.services.transfer import PeerDescriptor

    engine = _engine(backend, "prefill-mp", seed=seed)
    peer = PeerDescriptor.from_bytes(conn.recv())
    engine.connect(peer, timeout=10.0)
    while True:
        command = conn.recv()
        if command is None:
            break
        transfer_id, pairs, timeout = command
        start = time.monotonic()
        handle = engine.write(peer.worker_id, transfer_id, pairs, timeout=timeout)
        conn.send({"state": handle.state.name, "bytes": handle.bytes, "error": handle.error,
                   "elapsed": time.monotonic() - start})
    engine.close()

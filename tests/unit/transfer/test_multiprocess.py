"""Sender and receiver in separate (spawned) processes, for each backend."""
from __future__ import annotations

import multiprocessing as mp

import pytest

from tests.unit.transfer import peer_process
from tests.unit.transfer.helpers import BACKENDS

PAIRS = [(0, 5), (1, 6), (2, 7), (9, 1), (15, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_across_processes_then_peer_dies(backend):
    ctx = mp.get_context("spawn")
    recv_parent, recv_child = ctx.Pipe()
    send_parent, send_child = ctx.Pipe()
    receiver = ctx.Process(target=peer_process.receiver_main, args=(backend, recv_child, 11, "mp-1", PAIRS))
    sender = ctx.Process(target=peer_process.sender_main, args=(backend, send_child, 11))
    receiver.start()
    sender.start()
    try:
        assert recv_parent.poll(60), "receiver did not start"
        send_parent.send(recv_parent.recv())  # the receiver's descriptor, passed on by the parent
        send_parent.send(("mp-1", PAIRS, 10.0))
        assert send_parent.poll(60), "sender did not answer"
        sent = send_parent.recv()
        assert sent["state"] == "SUCCESS", sent
        assert recv_parent.poll(30), "receiver did not report"
        got = recv_parent.recv()
        expected = len(PAIRS) * 2 * 2 * 4 * 2 * 8 * 4  # K and V x 2 layers x 4 tokens x 2 heads x 8 x float32
        assert got == {"state": "SUCCESS", "bytes_received": expected, "bad": []}
        assert sent["bytes"] == expected

        receiver.kill()  # the peer dies without a goodbye
        receiver.join(10)
        send_parent.send(("mp-2", [(3, 3)], 1.0))
        assert send_parent.poll(30)
        dead = send_parent.recv()
        assert dead["state"] == "FAILED" and dead["error"], dead
        assert dead["elapsed"] < 2.0
        send_parent.send(None)
        sender.join(10)
        assert sender.exitcode == 0
    finally:
        for proc in (receiver, sender):
            if proc.is_alive():
                proc.kill()
                proc.join(5)

"""The cuda_ipc backend off the GPU: it refuses host memory with a clear error, its
descriptors travel like every other backend's, and a receiver takes only its own kind of
data message (the device copies themselves are tested in tests/gpu/test_nixl_vram.py)."""
from __future__ import annotations

import pytest

from baton.services.transfer import create_transfer_engine
from baton.services.transfer.descriptor import PeerDescriptor
from baton.services.transfer.tcp import TcpTransferEngine
from tests.unit.transfer.helpers import filled_memory, small_layout


def test_cuda_ipc_refuses_host_memory() -> None:
    with pytest.raises(ValueError, match="needs registered memory on a CUDA device.*use tcp or nixl"):
        create_transfer_engine("cuda_ipc", "w", filled_memory(small_layout(), seed=1))


def test_cuda_ipc_descriptor_round_trips() -> None:
    with TcpTransferEngine("w", filled_memory(small_layout(), seed=1)) as tcp:
        desc = tcp.descriptor()
    ipc = PeerDescriptor("w", desc.epoch, "cuda_ipc", desc.metadata, desc.layout)
    assert PeerDescriptor.from_bytes(ipc.to_bytes()) == ipc


def test_a_tcp_sender_cannot_talk_to_a_cuda_ipc_peer() -> None:
    from baton.services.transfer.descriptor import TransferError

    with TcpTransferEngine("a", filled_memory(small_layout(), seed=1)) as a, \
            TcpTransferEngine("b", filled_memory(small_layout(), seed=2)) as b:
        desc = b.descriptor()
        with pytest.raises(TransferError, match="speaks 'cuda_ipc', this engine 'tcp'"):
            a.connect(PeerDescriptor("b", desc.epoch, "cuda_ipc", desc.metadata, desc.layout))

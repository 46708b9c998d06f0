"""The late-encoder-write hazard: a worker gives up on an Encode attempt (its deadline passes),
its landing blocks go to another request, and the encoder's write of that attempt arrives
afterwards. A real encoder (tiny LLaVA, gRPC on loopback, tcp / nixl transfer) and a real
`WorkerImages`; the only fake is the failure injection: a transfer write delayed past the
worker's deadline."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.errors import BatonError, ErrorCode
from baton.services.encoder.encoder_config import EncoderConfig
from baton.services.encoder.servicer import EncoderMetrics, EncoderServicer
from baton.services.engine.config import EngineConfig
from baton.services.transfer.base import TransferState
from baton.services.worker.images import WorkerImages
from baton.services.worker.worker_config import WorkerConfig
from tests.helpers.tiny_models import IMAGE_TOKEN, make_tiny_vlm, tiny_image


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return make_tiny_vlm("llava", tmp_path_factory.mktemp("late-write") / "llava")


def delay_next_write(servicer: EncoderServicer, delay_s: float) -> dict:
    """Failure injection: the encoder's next transfer write starts `delay_s` late (a slow link)."""
    real_write, seen = servicer.transfer.write, {"done": threading.Event()}

    def write(peer, transfer_id, pairs, timeout):
        if "handle" in seen or seen.get("busy"):
            return real_write(peer, transfer_id, pairs, timeout)
        seen["busy"], seen["dst"] = True, sorted(d for _, d in pairs)
        time.sleep(delay_s)
        seen["handle"] = real_write(peer, transfer_id, pairs, 5.0)
        seen["done"].set()
        return seen["handle"]
    servicer.transfer.write = write
    return seen


async def scenario(folder, backend: str) -> None:
    servicer = EncoderServicer(EngineConfig(model=str(folder), device="cpu", dtype="float32"),
                               EncoderConfig(embedding_cache_bytes=1 << 20, batch_wait_ms=0.0),
                               WorkerConfig(transfer=backend, worker_id="enc-0"), EncoderMetrics(CollectorRegistry()))
    server = grpc.aio.server()
    worker_pb2_grpc.add_EncoderServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    images = WorkerImages.create(str(folder), torch.device("cpu"), torch.float32, "prefill", "prefill-0", backend,
                                 {}, CollectorRegistry(), None)
    try:
        await servicer.load("enc-0", {})
        images.late_write_grace_s = 2.0  # covers the injected delay (a real write ends by the deadline)
        prompt = [5, IMAGE_TOKEN["llava"], 6]
        _, expanded = images.expand(prompt, [worker_pb2.ImageInput(data=tiny_image(1))])
        expected = await images.embeddings("r0", expanded, [address], time.monotonic() + 20.0)  # cached now
        free_before = images.arena.num_free
        seen = delay_next_write(servicer, delay_s=0.8)
        with pytest.raises(BatonError) as failed:  # the write is late: the attempt gives up at its deadline
            await images.embeddings("r1", expanded, [address], time.monotonic() + 0.3)
        assert failed.value.code == ErrorCode.NO_WORKER
        # another request takes landing blocks now (the free list is LIFO: the attempt's, where freed)
        other = images.arena.allocate(expanded[0].num_tokens)
        sentinel = torch.full((expanded[0].num_tokens, images.arena.hidden_size), 7.0)
        images.arena.store(other, sentinel)
        assert await asyncio.to_thread(seen["done"].wait, 10.0)  # the late write has run
        assert torch.equal(images.arena.load(other, sentinel.shape[0]), sentinel)  # nothing of it landed there
        if backend == "tcp":  # refused by the fence; the blocks were free at once and are reused
            assert seen["handle"].state is TransferState.FAILED and "given up by the receiver" in seen["handle"].error
            assert sorted(other) == seen["dst"]
        else:  # one-sided: it landed in the quarantined blocks, which come back after the grace
            assert seen["handle"].ok and not set(other) & set(seen["dst"])
            assert images.quarantined_blocks == len(seen["dst"])
            deadline = time.monotonic() + 5.0
            while images.quarantined_blocks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert images.quarantined_blocks == 0
        images.arena.free(other)
        assert images.arena.num_free == free_before
        # the same encoder serves the next attempt (a new rendezvous id, not fenced): a cache hit
        got = await images.embeddings("r2", expanded, [address], time.monotonic() + 10.0)
        assert torch.equal(got[0], expected[0]) and servicer.metrics.tower_images._value.get() == 1
    finally:
        images.close()
        await servicer.close()
        await server.stop(0)


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_a_late_encoder_write_never_lands_in_reused_blocks(vlm, backend):
    if backend == "nixl":
        pytest.importorskip("nixl")
    asyncio.run(asyncio.wait_for(scenario(vlm, backend), 60))

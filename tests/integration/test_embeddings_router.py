"""Embeddings through the router core and real decode workers on loopback (`Decode.Embed`,
router/embedding.py): vectors equal the engine's own `embed` on the same tiny model (the wire
loses nothing), a bad input is INVALID_REQUEST and not retried, and with one of two decode
workers killed every request still succeeds on the other (an unreachable worker is retried
elsewhere) before the health loop has noticed."""
import asyncio
import signal

import pytest

from baton.protos.errors import BatonError, ErrorCode
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.types import Role
from baton.services.engine.config import EngineConfig
from baton.services.engine.engine import Engine
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.workers import start_worker, stop_all, wait_all_serving

INPUTS = [[5, 17, 33, 9, 101], [200, 3], list(range(10, 30))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("embed-model"))


@pytest.fixture(scope="module")
def workers(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    started = wait_all_serving([start_worker("decode", model, tmp, wait=False) for _ in range(2)])
    yield started
    stop_all(started)


async def with_core(addresses, fn):
    core = RouterCore(RouterConfig(decode=",".join(addresses), health_interval_s=0.2, health_timeout_s=1.0,
                                   retry_backoff_s=0.01, request_timeout_s=30))
    await core.start()
    try:
        for _ in range(200):
            if core.registry.healthy_count(Role.DECODE) == len(addresses):
                break
            await asyncio.sleep(0.05)
        return await fn(core)
    finally:
        await core.stop()


def test_vectors_equal_the_engine_and_failover(model, workers):
    reference = Engine(EngineConfig(model=str(model), page_size=4, kv_cache_tokens=512, num_threads=1))
    want = reference.embed(INPUTS)
    want_mean = reference.embed(INPUTS, pooling="mean", normalize=False)

    async def scenario(core):
        result = await core.embed(INPUTS)
        assert result.prompt_tokens == sum(len(i) for i in INPUTS)
        mean = await core.embed(INPUTS, pooling="mean", normalize=False)
        with pytest.raises(BatonError) as info:
            await core.embed([[1, 2], [10**6]])
        assert info.value.code == ErrorCode.INVALID_REQUEST and "out of range" in info.value.message
        entries = core.registry.candidates(Role.DECODE)
        chosen = core.decode_policy.select([e.view() for e in entries], []).address
        victim = next(w for w in workers if w.address == chosen)  # the one the next request goes to
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        after = [await core.embed(INPUTS[:1]) for _ in range(4)]  # some go to the dead one first
        retried = sum(s.value for m in core.metrics.retries.collect() for s in m.samples
                      if s.name.endswith("_total"))
        assert retried >= 1  # the dead worker was tried, and the request moved on
        return result, mean, after

    result, mean, after = asyncio.run(with_core([w.address for w in workers], scenario))
    for got, expected in zip(result.vectors, want):
        assert got == pytest.approx(expected, abs=1e-5)
    for got, expected in zip(mean.vectors, want_mean):
        assert got == pytest.approx(expected, abs=1e-5)
    for one in after:
        assert one.vectors[0] == pytest.approx(want[0], abs=1e-5)

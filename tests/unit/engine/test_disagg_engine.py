"""The disaggregation hooks in-process: a prefill engine leases its blocks, their KV is
copied into a decode engine's reserved blocks, and the decode engine continues to exactly
the colocated output. Reservation failure, cancel and abort give every block back."""
import random

import pytest

from baton.services.engine.config import EngineConfig
from baton.services.engine.disagg import DisaggEngine
from baton.services.engine.engine import Engine
from baton.services.engine.sampling_params import SamplingParams
from tests.helpers.tiny_models import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("disagg"))


def engine(folder, cls=DisaggEngine, **options):
    options = dict(model=str(folder), page_size=4, kv_cache_tokens=512, num_threads=1) | options
    return cls(EngineConfig(**options))


def run(engine, request_id):
    tokens = []
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.parent_id == request_id:
                tokens += delta.new_token_ids
    return tokens


def copy_blocks(src, dst, pairs):
    for layer in range(len(src.kv_cache.keys)):
        for s, d in pairs:
            page = src.config.page_size
            for cache_src, cache_dst in ((src.kv_cache.keys, dst.kv_cache.keys), (src.kv_cache.values, dst.kv_cache.values)):
                cache_dst[layer][d * page:(d + 1) * page] = cache_src[layer][s * page:(s + 1) * page]


def handoff(prefill, decode, rid, prompt, params):
    reservation = decode.reserve(rid, prompt, params)
    prefill.add_request(rid, prompt, SamplingParams(**{**params.__dict__, "max_tokens": 1}), hold_blocks=True)
    first = run(prefill, rid)
    held = prefill.held_blocks(rid)
    start = reservation.cached_tokens // decode.config.page_size
    copy_blocks(prefill, decode, list(zip(held[start:], reservation.block_ids[start:])))
    prefill.release_held(rid)
    delta = decode.activate(rid, first[0])
    return reservation, delta.new_token_ids + run(decode, rid)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                    SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)])
def test_handoff_continues_exactly_like_colocated(folder, params):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 5, 23, 40)]
    colocated = engine(folder, cls=Engine)
    prefill, decode = engine(folder), engine(folder, page_size=4)
    for i, prompt in enumerate(prompts):
        colocated.add_request(f"c{i}", prompt, params)
        expected = run(colocated, f"c{i}")
        _, got = handoff(prefill, decode, f"d{i}", prompt, params)
        assert got == expected
    for e in (colocated, prefill, decode):
        e.check_idle_integrity()


def test_decode_prefix_cache_shrinks_what_is_moved(folder):
    prefill, decode = engine(folder), engine(folder)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prefix = list(range(3, 35))
    first, _ = handoff(prefill, decode, "a", prefix + [40], params)
    second, _ = handoff(prefill, decode, "b", prefix + [50, 51], params)
    assert first.cached_tokens == 0 and second.cached_tokens == 32
    decode.check_idle_integrity()


def test_reservation_refused_when_memory_is_short_and_cancel_returns_blocks(folder):
    decode = engine(folder, kv_cache_tokens=16, disable_radix_cache=True)
    params = SamplingParams(max_tokens=2)
    reservation = decode.reserve("ok", list(range(3, 10)), params)
    assert len(reservation.block_ids) == 2 and decode.pool.num_free == 2
    assert decode.reserve("big", list(range(3, 14)), params) is None  # needs 3 blocks, 2 free
    decode.cancel_reservation("ok")
    assert decode.pool.num_free == 4
    decode.reserve("again", list(range(3, 10)), params)
    assert [d.finish_reason for d in decode.abort("again")] == ["abort"]
    decode.check_idle_integrity()


def test_lease_keeps_blocks_until_released(folder):
    prefill = engine(folder, kv_cache_tokens=32, disable_radix_cache=True)
    prefill.add_request("p", list(range(3, 13)), SamplingParams(max_tokens=1), hold_blocks=True)
    run(prefill, "p")
    assert len(prefill.held_blocks("p")) == 3 and prefill.pool.num_free == 5
    prefill.release_held("p")
    assert prefill.pool.num_free == 8
    prefill.check_idle_integrity()

"""Prefill and decode as real processes on loopback, for each transfer backend: outputs
equal the colocated engine's token for token; decode-side prefix reuse moves only the
missing blocks; the decode-only path; usage numbers."""
import asyncio
import random

import pytest

from baton.services.engine import LLM, SamplingParams
from tests.helpers.grpc_client import decode_generate, worker_info
from tests.helpers.tiny_models import VOCAB, make_tiny_model
from tests.helpers.workers import start_worker, stop_all, wait_all_serving

PAGE = 4
CHUNK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("disagg-model"))


@pytest.fixture(scope="module")
def colocated(model):
    return LLM(model=str(model), page_size=PAGE, kv_cache_tokens=4096, chunked_prefill_size=CHUNK, num_threads=1)


@pytest.fixture(scope="module", params=["tcp", "nixl", "nccl"])  # nccl: over gloo on the CPU
def cluster(request, model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"cluster-{request.param}")
    prefill, decode = wait_all_serving([start_worker(role, model, tmp, transfer=request.param, chunked_prefill_size=CHUNK,
                                                     wait=False) for role in ("prefill", "decode")])
    yield request.param, prefill, decode
    codes = stop_all((decode, prefill))
    assert codes == [0, 0], decode.log()[-2000:] + prefill.log()[-2000:]


def prompts(seed, count=6):
    rng = random.Random(seed)
    lengths = [1, 5, CHUNK * 3 + 5, 70] + [rng.randrange(2, 60) for _ in range(count - 4)]
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


async def run_all(decode, batch, params, prefill=""):
    results = await asyncio.gather(*(decode_generate(decode.address, p, params, prefill=prefill) for p in batch))
    return [r[0] for r in results]


def test_disaggregated_equals_colocated(cluster, colocated):
    _, prefill, decode = cluster
    batch = prompts(seed=11)
    got = asyncio.run(run_all(decode, batch, GREEDY, prefill=prefill.address))
    expected = colocated.generate(batch, GREEDY)
    for completion, reference, prompt in zip(got, expected, batch):
        assert completion.token_ids == reference.outputs[0].token_ids
        assert completion.finish_reason == "length"
        assert completion.usage.prompt_tokens == len(prompt) and completion.usage.completion_tokens == 12
    assert prefill.metric("baton_kv_transfer_bytes_total", direction="out") > 0


def test_seeded_sampling_and_stop_tokens_survive_the_handoff(cluster, colocated):
    _, prefill, decode = cluster
    batch = prompts(seed=12, count=4)
    params = SamplingParams(temperature=0.9, top_k=50, seed=5, max_tokens=10, ignore_eos=True)
    got = asyncio.run(run_all(decode, batch, params, prefill=prefill.address))
    expected = colocated.generate(batch, params)
    assert [c.token_ids for c in got] == [r.outputs[0].token_ids for r in expected]


def test_decode_only_path_equals_colocated(cluster, colocated):
    _, _, decode = cluster
    batch = prompts(seed=13, count=4)
    tokens = "baton_worker_engine_scheduled_tokens_total"
    before = [decode.metric(tokens, kind=k) for k in ("prefill", "decode")]
    steps_before = decode.metric("baton_worker_engine_step_seconds_count")
    got = asyncio.run(run_all(decode, batch, GREEDY))
    assert [c.token_ids for c in got] == [r.outputs[0].token_ids for r in colocated.generate(batch, GREEDY)]
    # the decode worker prefilled these prompts itself; each later token is one decode token (a prompt
    # of one token is scheduled as a decode-sized item, hence the bounds)
    prefill, decode_tokens = (decode.metric(tokens, kind=k) - b for k, b in zip(("prefill", "decode"), before))
    assert sum(len(p) for p in batch) - len(batch) <= prefill <= sum(len(p) for p in batch)
    assert decode_tokens >= len(batch) * (GREEDY.max_tokens - 1)
    assert decode.metric("baton_worker_engine_step_seconds_count") - steps_before >= GREEDY.max_tokens
    n_params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    two = asyncio.run(decode_generate(decode.address, batch[0], n_params))
    assert len(two) == 2 and all(len(c.token_ids) == 6 for c in two)


def test_decode_prefix_reuse_moves_only_missing_blocks(cluster, colocated):
    backend, prefill, decode = cluster
    rng = random.Random(14)
    prefix = [rng.randrange(3, VOCAB) for _ in range(48)]
    first, second = prefix + [7, 8, 9], prefix + [17, 18, 19, 20, 21, 22]
    layout = asyncio.run(worker_info(decode.address)).transfer.layout
    block_bytes = 2 * layout.num_layers * PAGE * layout.num_kv_heads * layout.head_dim * 4
    moved = []
    for prompt in (first, second):
        before = decode.metric("baton_kv_transfer_bytes_total", direction="in")
        [completion] = asyncio.run(decode_generate(decode.address, prompt, GREEDY, prefill=prefill.address))
        moved.append(decode.metric("baton_kv_transfer_bytes_total", direction="in") - before)
        assert completion.token_ids == colocated.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert moved[0] == 13 * block_bytes               # ceil(51 / 4) pages, nothing cached yet
    assert moved[1] == (14 - 12) * block_bytes         # 48 cached tokens = 12 pages stay on decode
    assert completion.usage.cached_tokens == 48


def test_prefill_cache_hits_count_as_cached_tokens(cluster, colocated, model, tmp_path):
    """A prompt prefill has seen, sent through a decode worker that has not: the prefill
    worker's own prefix hit shows in usage.cached_tokens (hits count wherever they happen)."""
    backend, prefill, decode = cluster
    if backend != "tcp":
        pytest.skip("one backend is enough: the count does not depend on the transfer")
    rng = random.Random(15)
    prompt = [rng.randrange(3, VOCAB) for _ in range(41)]
    [first] = asyncio.run(decode_generate(decode.address, prompt, GREEDY, prefill=prefill.address))
    fresh = start_worker("decode", model, tmp_path, transfer=backend, chunked_prefill_size=CHUNK)
    try:
        [again] = asyncio.run(decode_generate(fresh.address, prompt, GREEDY, prefill=prefill.address))
    finally:
        fresh.stop()
    assert first.usage.cached_tokens == 0
    assert again.usage.cached_tokens == 40             # 10 whole pages found in prefill's radix cache
    assert again.token_ids == first.token_ids == colocated.generate([prompt], GREEDY)[0].outputs[0].token_ids

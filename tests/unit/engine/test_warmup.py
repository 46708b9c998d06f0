"""Warm-up on CPU (where it never runs by itself): the plan it sizes to an engine, and that
running it leaves the engine idle and whole (every block free, handed out from id 0, no
request, zero counters, the default random state untouched) with unchanged outputs."""
import pytest
import torch

from baton.services.engine.config import EngineConfig
from baton.services.engine.disagg import DisaggEngine
from baton.services.engine.engine import Engine
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.warmup import MAX_NEW, plan_warmup
from tests.helpers.tiny_models import make_tiny_model

PAGE, TOKENS = 4, 512
OPTIONS = dict(page_size=PAGE, kv_cache_tokens=TOKENS, chunked_prefill_size=32, max_num_batched_tokens=40,
               max_running_requests=8, num_threads=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("warmup"))


def test_plan_on_a_large_gpu_reaches_every_step_shape():
    plan = plan_warmup(page_size=16, prefill_chunk=8192, max_num_batched_tokens=8192, max_running_requests=1024,
                       num_blocks=200_000, max_model_len=131072, graph_sizes=(1, 2, 4, 8, 512))
    assert plan.prefill_lengths[:2] == (8192 + 2 * 16 + 3, 8192)  # a chunked prompt, then a whole chunk
    assert min(plan.prefill_lengths) == 1 and len(plan.prefill_lengths) == 8
    assert plan.decode_batches == (1, 3, 512, 1024)  # graphed sizes and an eager batch past the graphs


def test_plan_shrinks_to_a_small_pool_and_context():
    plan = plan_warmup(page_size=4, prefill_chunk=1 << 30, max_num_batched_tokens=4096, max_running_requests=256,
                       num_blocks=20, max_model_len=40)
    assert all(n <= 40 - MAX_NEW - 2 for n in plan.prefill_lengths)
    assert sum(-(-(n + MAX_NEW + 1) // 4) for n in plan.prefill_lengths) <= 19
    assert plan.decode_batches[-1] <= 19 // 4 and plan.decode_batches[0] == 1


def greedy(engine, prompts):
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for delta in engine.step():
            out[delta.request_id] += delta.new_token_ids
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("cls", [Engine, DisaggEngine])
def test_warmup_leaves_the_engine_idle_and_whole(folder, cls):
    cold = cls(EngineConfig(model=str(folder), **OPTIONS))
    fresh_stats = cold.stats()
    engine = cls(EngineConfig(model=str(folder), **OPTIONS))
    rng = torch.random.get_rng_state()
    engine.warmup()
    assert torch.equal(torch.random.get_rng_state(), rng)
    engine.check_idle_integrity()
    stats = engine.stats()
    assert stats == fresh_stats
    assert stats.free_blocks == stats.total_blocks == TOKENS // PAGE and stats.cached_blocks == 0
    assert stats.prefix_tokens_looked_up == stats.prefix_tokens_matched == stats.preemptions == 0
    assert not engine.has_unfinished() and not engine._requests and engine.num_overlapped_steps == 0
    assert engine.pool.allocate(3) == [0, 1, 2]  # handed out from id 0 again, as in a new pool
    engine.pool.release([0, 1, 2])
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 41)]
    assert greedy(engine, prompts) == greedy(cold, prompts)


def test_warmup_refuses_a_busy_engine(folder):
    engine = Engine(EngineConfig(model=str(folder), **OPTIONS))
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        engine.warmup()


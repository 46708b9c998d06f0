"""Greedy outputs of the engine equal transformers' `generate`, token for token.

Tiny random-weight Llama / Llama-3-rope / Qwen2 / Qwen3 / Mistral models (different GQA
ratios, head dims, tied and untied embeddings) run batched with mixed prompt lengths,
under every scheduling regime: chunked prefill on and off, radix cache on and off,
several page sizes, and a KV budget small enough to force preemption.
"""
import random

import pytest

from baton.services.engine import SamplingParams
from tests.helpers.tiny_models import VOCAB, hf_greedy

FAMILIES = ["llama", "llama3_rope", "qwen2", "qwen3", "mistral"]
MAX_NEW = 24


def mixed_prompts(seed: int, count: int = 6, longest: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, longest] + [rng.randrange(2, longest) for _ in range(count - 3)]
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def assert_matches_hf(llm, hf, prompts, ignore_eos=True, max_new=MAX_NEW):
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=ignore_eos)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        expected = hf_greedy(hf, prompt, max_new, ignore_eos=ignore_eos)
        assert out.outputs[0].token_ids == expected, f"prompt of {len(prompt)} tokens diverged"


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_transformers(family, tiny_model, hf_model, make_llm):
    folder = tiny_model(family)
    llm = make_llm(folder, page_size=4, kv_cache_tokens=2048, chunked_prefill_size=32)
    assert_matches_hf(llm, hf_model(folder), mixed_prompts(seed=1))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_stopping_at_eos_equals_transformers(family, tiny_model, hf_model, make_llm):
    folder = tiny_model(family)
    llm = make_llm(folder, page_size=4, kv_cache_tokens=2048)
    prompts = mixed_prompts(seed=2, count=10, longest=30)
    assert_matches_hf(llm, hf_model(folder), prompts, ignore_eos=False, max_new=40)


REGIMES = {
    "chunked_8": dict(chunked_prefill_size=8, max_num_batched_tokens=24),
    "unchunked": dict(chunked_prefill_size=-1),
    "no_radix": dict(disable_radix_cache=True, chunked_prefill_size=16),
    "page_1": dict(page_size=1),
    "page_16": dict(page_size=16, chunked_prefill_size=20),
    "lpm": dict(schedule_policy="lpm"),
    "priority": dict(schedule_policy="priority", max_running_requests=2),
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_scheduling_regimes_do_not_change_outputs(regime, tiny_model, hf_model, make_llm):
    folder = tiny_model("llama")
    options = dict(page_size=4, kv_cache_tokens=2048) | REGIMES[regime]
    llm = make_llm(folder, **options)
    assert_matches_hf(llm, hf_model(folder), mixed_prompts(seed=3, count=8))


def test_preemption_under_small_kv_budget_keeps_outputs(tiny_model, hf_model, make_llm):
    folder = tiny_model("qwen2")
    # 8 prompts of up to 70 tokens + 24 new ones need ~500 tokens of KV at once; give 160.
    llm = make_llm(folder, page_size=4, kv_cache_tokens=160, chunked_prefill_size=16)
    assert_matches_hf(llm, hf_model(folder), mixed_prompts(seed=4, count=8))
    assert llm.engine.stats().preemptions > 0


def test_shared_prefix_reports_cached_tokens_and_matches_uncached(tiny_model, hf_model, make_llm):
    folder = tiny_model("llama")
    rng = random.Random(5)
    prefix = [rng.randrange(3, VOCAB) for _ in range(37)]
    first, second = prefix + [10, 11, 12], prefix + [20, 21]
    llm = make_llm(folder, page_size=4, kv_cache_tokens=2048)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    out1 = llm.generate([first], params)[0]
    out2 = llm.generate([second], params)[0]
    assert out1.num_cached_tokens == 0
    assert out2.num_cached_tokens == 36  # the 37-token prefix's whole pages
    uncached = make_llm(folder, page_size=4, kv_cache_tokens=2048, disable_radix_cache=True)
    assert out2.outputs[0].token_ids == uncached.generate([second], params)[0].outputs[0].token_ids
    assert out2.outputs[0].token_ids == hf_greedy(hf_model(folder), second, MAX_NEW, ignore_eos=True)
    hit_rate = llm.engine.stats().prefix_hit_rate
    assert 0 < hit_rate < 1


def test_repeated_prompt_is_served_from_cache_with_same_output(tiny_model, make_llm):
    folder = tiny_model("mistral")
    llm = make_llm(folder, page_size=4, kv_cache_tokens=2048)
    prompt = mixed_prompts(seed=6, count=3)[2]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    a = llm.generate([prompt], params)[0]
    b = llm.generate([prompt], params)[0]
    assert b.num_cached_tokens == (len(prompt) - 1) // 4 * 4
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_sharded_checkpoint_with_index_loads_and_matches(tmp_path, hf_model, make_llm):
    from tests.helpers.tiny_models import make_tiny_model
    folder = make_tiny_model("qwen3", tmp_path / "sharded", seed=3, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    llm = make_llm(folder, page_size=4, kv_cache_tokens=1024)
    assert_matches_hf(llm, hf_model(folder), mixed_prompts(seed=7, count=4))


def run_steps(engine, arrivals: dict[int, dict[str, list[int]]], params) -> tuple[dict[str, list[int]], list]:
    """Step the engine, adding arrivals[step] before that step; (tokens per request, schedules)."""
    tokens: dict[str, list[int]] = {}
    schedules = []
    step = 0
    while engine.has_unfinished() or step <= max(arrivals):
        for rid, prompt in arrivals.get(step, {}).items():
            engine.add_request(rid, prompt, params)
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        schedules.append(engine.last_schedule)
        step += 1
    for delta in engine.flush():
        tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
    return tokens, schedules


def test_mixed_prefill_chunks_and_decodes_equal_each_request_alone(tiny_model, hf_model, make_llm):
    """Steps that carry decode tokens together with several prefill chunks of different lengths
    (first chunks and later ones, with cached prefixes) give each request the tokens it gets alone."""
    folder = tiny_model("llama3_rope")
    rng = random.Random(8)
    prompt = lambda n: [rng.randrange(3, VOCAB) for _ in range(n)]  # noqa: E731
    arrivals = {0: {"d0": prompt(5), "d1": prompt(9)},
                3: {"p0": prompt(70), "p1": prompt(30), "p2": prompt(11)},
                5: {"p3": prompt(45), "p4": prompt(2)}}
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = make_llm(folder, page_size=4, kv_cache_tokens=4096, chunked_prefill_size=24, max_num_batched_tokens=64)
    tokens, schedules = run_steps(llm.engine, arrivals, params)
    mixed = [s for s in schedules if sum(n == 1 for _, _, n in s) >= 2
             and len({n for _, _, n in s if n > 1}) >= 2 and any(start > 0 for _, start, n in s if n > 1)]
    assert mixed, f"no step mixed decodes with prefill chunks of different lengths: {schedules}"
    alone = make_llm(folder, page_size=4, kv_cache_tokens=4096, disable_radix_cache=True)
    hf = hf_model(folder)
    for rid, p in (item for step in arrivals.values() for item in step.items()):
        expected = alone.generate([p], params)[0].outputs[0].token_ids
        assert tokens[rid] == expected, f"{rid} ({len(p)} prompt tokens) diverged in the mixed run"
        assert expected == hf_greedy(hf, p, 16, ignore_eos=True)

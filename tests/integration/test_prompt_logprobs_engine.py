"""Prompt logprobs in the engine equal a direct computation with transformers on the same
weights: every prompt position (the first token has none), top alternatives, under chunked
prefill, with a cached prefix (which must not be reused for the positions that need logits,
but is reused before `prompt_logprobs_start`), through preemption, and with n > 1."""
import random

import pytest
import torch

from baton.services.engine import SamplingParams
from tests.helpers.tiny_models import VOCAB

PAGE = 4


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab] log-softmax of transformers' logits: row i predicts prompt[i + 1]."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def assert_entries_match(entries, hf, prompt, start=0, top=0):
    reference = hf_prompt_logprobs(hf, prompt)
    first = max(start, 1)
    assert [e["token_id"] for e in entries] == prompt[first:]
    for position, entry in zip(range(first, len(prompt)), entries):
        row = reference[position - 1]
        assert entry["logprob"] == pytest.approx(row[prompt[position]].item(), abs=1e-4)
        values, ids = row.topk(top)
        assert [t for t, _ in entry["top_logprobs"]] == ids.tolist()
        assert [lp for _, lp in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)


def prompt_of(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("llama")


def test_every_prompt_position_under_chunked_prefill(folder, hf_model, make_llm):
    llm = make_llm(folder, page_size=PAGE, kv_cache_tokens=2048, chunked_prefill_size=8, max_num_batched_tokens=12)
    prompts = [prompt_of(1, 37), prompt_of(2, 2), prompt_of(3, 1), prompt_of(4, 19)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2))
    for prompt, out in zip(prompts, outputs):
        assert len(out.prompt_logprobs) == len(prompt) - 1
        assert_entries_match(out.prompt_logprobs, hf_model(folder), prompt, top=2)
        assert len(out.outputs[0].token_ids) == 3


def test_a_cached_prefix_is_not_reused_for_positions_needing_logits(folder, hf_model, make_llm):
    llm = make_llm(folder, page_size=PAGE, kv_cache_tokens=2048)
    prompt = prompt_of(5, 30)
    warm = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))[0]
    again = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))[0]
    assert warm.num_cached_tokens == 0 and again.num_cached_tokens == 28  # the cache works
    scored = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))[0]
    assert scored.num_cached_tokens == 0
    assert_entries_match(scored.prompt_logprobs, hf_model(folder), prompt)


def test_the_prefix_before_the_start_comes_from_the_cache(folder, hf_model, make_llm):
    llm = make_llm(folder, page_size=PAGE, kv_cache_tokens=2048)
    prefix = prompt_of(6, 22)
    llm.generate([prefix], SamplingParams(temperature=0.0, max_tokens=1))
    choices = [prefix + prompt_of(7, 3), prefix + prompt_of(8, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, prompt_logprobs_start=len(prefix))
    for prompt, out in zip(choices, llm.generate(choices, params)):
        assert out.num_cached_tokens == 20  # whole pages below position len(prefix) - 1 = 21
        assert len(out.prompt_logprobs) == len(prompt) - len(prefix)
        assert_entries_match(out.prompt_logprobs, hf_model(folder), prompt, start=len(prefix), top=1)


def test_preemption_recomputes_without_repeating_entries(folder, hf_model, make_llm):
    llm = make_llm(folder, page_size=PAGE, kv_cache_tokens=96, chunked_prefill_size=8, max_num_batched_tokens=16)
    prompts = [prompt_of(10 + i, 30) for i in range(4)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert_entries_match(out.prompt_logprobs, hf_model(folder), prompt)


def test_n_completions_share_one_prompt_answer(folder, hf_model, make_llm):
    llm = make_llm(folder, page_size=PAGE, kv_cache_tokens=2048)
    prompt = prompt_of(20, 11)
    [out] = llm.generate([prompt], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=2, prompt_logprobs=0))
    assert_entries_match(out.prompt_logprobs, hf_model(folder), prompt)


def test_bad_prompt_logprob_requests_are_refused(folder, make_llm):
    llm = make_llm(folder, page_size=PAGE, kv_cache_tokens=2048)
    with pytest.raises(ValueError, match="prompt_logprobs_start needs prompt_logprobs"):
        SamplingParams(prompt_logprobs_start=2)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, 20\]"):
        SamplingParams(prompt_logprobs=21)
    [out] = llm.generate([[5, 6, 7]], SamplingParams(prompt_logprobs=0, prompt_logprobs_start=3))
    assert "prompt_logprobs_start (3) must be less than the prompt's length (3)" in out.error

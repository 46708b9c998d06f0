"""Prompt logprobs on CUDA (Triton attention, CUDA graphs and overlap scheduling on): equal to
transformers' on the same tiny float32 weights, under chunked prefill, with a cached prefix
before `prompt_logprobs_start`, and batched with plain requests that replay decode graphs."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine import LLM, SamplingParams  # noqa: E402
from tests.helpers.tiny_models import VOCAB, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("plp-gpu"))


@pytest.fixture(scope="module")
def reference(folder):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cuda").eval()

    def logprobs(prompt: list[int]) -> list[float]:
        with torch.no_grad():
            out = torch.log_softmax(model(torch.tensor([prompt], device="cuda")).logits[0].float(), dim=-1)
        return [out[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    return logprobs


def prompt_of(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def test_prompt_logprobs_on_cuda_equal_transformers(folder, reference):
    llm = LLM(model=str(folder), device="cuda", dtype="float32", kv_cache_tokens=4096, page_size=4,
              chunked_prefill_size=16)
    assert llm.engine.overlap_schedule and llm.engine.runner.use_graphs
    scored = [prompt_of(1, 50), prompt_of(2, 9), prompt_of(3, 300)]
    plain = [prompt_of(4 + i, 20) for i in range(4)]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)] * 3 + \
             [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 4
    outputs = llm.generate(scored + plain, params)
    for prompt, out in zip(scored, outputs):
        got = [e["logprob"] for e in out.prompt_logprobs]
        assert [e["token_id"] for e in out.prompt_logprobs] == prompt[1:]
        assert got == pytest.approx(reference(prompt), abs=2e-3)
    assert all(not out.prompt_logprobs for out in outputs[3:])
    prefix = prompt_of(9, 40)
    llm.generate([prefix], SamplingParams(temperature=0.0, max_tokens=1))
    choice = prefix + prompt_of(10, 6)
    [out] = llm.generate([choice], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                                  prompt_logprobs_start=len(prefix)))
    assert out.num_cached_tokens == 36
    assert [e["logprob"] for e in out.prompt_logprobs] == pytest.approx(reference(choice)[len(prefix) - 1:],
                                                                         abs=2e-3)

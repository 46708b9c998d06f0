"""The engine on CUDA (Triton attention) against transformers on CUDA.

float32: greedy outputs equal transformers' token for token on the tiny Llama / Qwen3 /
Mistral configs, batched with mixed prompt lengths, chunked prefill and several page sizes
(so decode, extend and mixed steps all run). bfloat16: the first-step logits of a prompt
are close to transformers' bfloat16 logits.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine import LLM, SamplingParams  # noqa: E402
from tests.helpers.tiny_models import VOCAB, hf_greedy, make_tiny_model  # noqa: E402

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    built = {}

    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = make_tiny_model(name, tmp_path_factory.mktemp(name), **overrides)
        return built[key]
    return get


def load_hf_on(folder, device: str, dtype: torch.dtype):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


def mixed_prompts(seed: int, count: int = 6, longest: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, longest] + [rng.randrange(2, longest) for _ in range(count - 3)]
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def hf_greedy_on(model, prompt: list[int], max_new: int) -> list[int]:
    """hf_greedy with the prompt on the model's device."""
    import copy
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens = False, max_new
    config.temperature = config.top_p = config.top_k = None
    config.eos_token_id = [10**9]
    config.pad_token_id = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), generation_config=config,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device))
    return out[0, len(prompt):].tolist()


def assert_engine_matches_hf(llm: LLM, hf, prompts: list[list[int]], max_new: int = MAX_NEW) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        expected = hf_greedy_on(hf, prompt, max_new)
        assert out.outputs[0].token_ids == expected, f"prompt of {len(prompt)} tokens diverged"


def backend_name(llm: LLM) -> str:
    return type(llm.engine.runner.backend).__name__


GREEDY_CASES = [
    ("llama", dict(page_size=4, chunked_prefill_size=32)),
    ("qwen3", dict(page_size=16, chunked_prefill_size=20)),
    ("mistral", dict(page_size=1, chunked_prefill_size=-1)),
    ("llama", dict(page_size=16, chunked_prefill_size=8, max_num_batched_tokens=24)),
]


@pytest.mark.parametrize("family,options", GREEDY_CASES, ids=lambda x: x if isinstance(x, str) else
                         "_".join(f"{k}{v}" for k, v in x.items()))
def test_float32_greedy_equals_transformers_on_cuda(family, options, tiny_folder):
    folder = tiny_folder(family)
    llm = LLM(model=str(folder), device="cuda", dtype="float32", kv_cache_tokens=4096, **options)
    assert backend_name(llm) == "TritonAttentionBackend"
    hf = load_hf_on(folder, "cuda", torch.float32)
    assert_engine_matches_hf(llm, hf, mixed_prompts(seed=1, count=8))


def test_float32_sliding_window_equals_transformers_on_cuda(tiny_folder):
    """Mistral with a window shorter than the prompts: the windowed kernels against HF's sdpa/eager."""
    folder = tiny_folder("mistral", sliding_window=16)
    llm = LLM(model=str(folder), device="cuda", dtype="float32", kv_cache_tokens=4096, page_size=4,
              chunked_prefill_size=24)
    if llm.engine.model_config.sliding_window != 16:
        pytest.skip("the engine does not read this config's sliding window")
    hf = load_hf_on(folder, "cuda", torch.float32)
    assert_engine_matches_hf(llm, hf, mixed_prompts(seed=2, count=5, longest=60))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_bfloat16_first_step_logits_close_to_transformers(family, tiny_folder):
    folder = tiny_folder(family)
    llm = LLM(model=str(folder), device="cuda", dtype="bfloat16", kv_cache_tokens=4096, page_size=16)
    assert backend_name(llm) == "TritonAttentionBackend"
    hf = load_hf_on(folder, "cuda", torch.bfloat16)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 37, 100)]
    engine = llm.engine
    from baton.services.engine.scheduling.scheduler import ScheduledItem
    from baton.services.engine.request import Request
    blocks_needed = [(len(p) + 15) // 16 for p in prompts]
    free = iter(range(engine.pool.num_blocks))
    items = []
    for i, prompt in enumerate(prompts):
        req = Request(request_id=f"r{i}", parent_id=f"r{i}", index=0, prompt_token_ids=list(prompt),
                      params=SamplingParams(max_tokens=1), arrival=i)
        req.block_table = [next(free) for _ in range(blocks_needed[i])]
        items.append(ScheduledItem(request=req, start=0, num_tokens=len(prompt)))
    logits = engine.runner.execute(items)
    for prompt, got in zip(prompts, logits):
        with torch.no_grad():
            want = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        err = ((got - want).norm() / want.norm()).item()
        print(f"{family} bf16 logits, prompt {len(prompt)}: relative error {err:.2e}, "
              f"argmax {'same' if got.argmax() == want.argmax() else 'differs'}")
        assert err < 3e-2, f"relative error {err:.2e}"

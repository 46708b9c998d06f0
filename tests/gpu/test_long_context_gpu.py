"""A 32k-token prompt end to end on the GPU, against transformers on the same GPU.

A random-weight Llama with Llama-3.1's shape of rope (llama3 scaling, factor 8, original window
8,192, max_position_embeddings 131,072) and small layers (2 layers, 8 query / 2 KV heads of 128,
width 1,024), one prompt of 32,768 tokens prefilled in chunks through the Triton extend kernel,
then decoded over the 32k context by the decode kernel:

- float32: the engine's greedy tokens equal transformers' (sdpa, float32, on the GPU) token
  for token, and the logprob of every prompt token is within 2e-3 (absolute) of transformers';
- bfloat16: the engine's prompt logprobs against the same float32 reference, mean absolute
  error under 0.05, and the first sampled token's top-20 logprobs within 0.25 of the reference's
  at the same ids (the figures and the greedy agreement are printed, so they can be quoted).

Runtime on an H200: about 30-60 s (most of it transformers' float32 passes).
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine import LLM, SamplingParams  # noqa: E402
from tests.helpers.tiny_models import make_tiny_model  # noqa: E402

DEVICE = "cuda"
PROMPT_LEN = 32768
MAX_NEW = 8
VOCAB_32K = 2048
SHAPE = dict(vocab_size=VOCAB_32K, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, head_dim=128, initializer_range=0.05,
             max_position_embeddings=131072, tie_word_embeddings=False,
             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192))
ENGINE = dict(device=DEVICE, page_size=16, kv_cache_tokens=PROMPT_LEN + 1024, chunked_prefill_size=4096,
              max_num_batched_tokens=4096, skip_tokenizer_init=True, cuda_graph_max_bs=1,
              piecewise_cuda_graph_max_tokens=0)
"""One request: one decode graph (batch 1, over the 32k context) is all it replays; no piecewise graphs."""


@pytest.fixture(scope="module")
def long_case(tmp_path_factory):
    """(folder, prompt, float32 reference greedy tokens, float32 reference prompt logprobs [P-1])."""
    import transformers
    folder = make_tiny_model("llama3_rope", tmp_path_factory.mktemp("long32k"), seed=5, **SHAPE)
    rng = random.Random(32)
    prompt = [rng.randrange(3, VOCAB_32K) for _ in range(PROMPT_LEN)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(DEVICE).eval()
    ids = torch.tensor([prompt], device=DEVICE)
    with torch.no_grad():
        logits = hf(ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        reference_lp = logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0].cpu()
        last_logits = logits[-1].cpu()
        del logits, logprobs
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                          eos_token_id=[10**9], pad_token_id=0, temperature=None, top_p=None, top_k=None)
    tokens = out[0, PROMPT_LEN:].tolist()
    del hf
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return folder, prompt, tokens, reference_lp, last_logits


def run_engine(folder, prompt, dtype: str):
    """(greedy tokens, prompt logprobs [P-1], first-token top logprobs, prefill steps) of the engine."""
    llm = LLM(model=str(folder), dtype=dtype, **ENGINE)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, prompt_logprobs=0, logprobs=20)
    engine.add_request("long", prompt, params)
    deltas, chunks = [], []
    while engine.has_unfinished():
        deltas.extend(engine.step())
        chunks += [n for _, _, n in engine.last_schedule if n > 1]
    deltas.extend(engine.flush())
    tokens = [t for d in deltas for t in d.new_token_ids]
    entries = [e for d in deltas for e in (d.prompt_logprobs or [])]
    assert [e["token_id"] for e in entries] == prompt[1:]
    first_top = next(d.new_logprobs for d in deltas if d.new_token_ids)
    del llm, engine
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return tokens, torch.tensor([e["logprob"] for e in entries]), first_top, chunks


def test_32k_prompt_float32_equals_transformers(long_case):
    folder, prompt, want_tokens, want_lp, _ = long_case
    tokens, got_lp, _, chunks = run_engine(folder, prompt, "float32")
    assert len(chunks) == PROMPT_LEN // ENGINE["chunked_prefill_size"], chunks
    err = (got_lp - want_lp).abs()
    print(f"float32 32k: prompt logprob abs error max {err.max():.2e} mean {err.mean():.2e}; "
          f"tail (last 8k positions) max {err[-8192:].max():.2e}")
    assert tokens == want_tokens
    assert err.max().item() < 2e-3


def test_32k_prompt_bfloat16_close_to_transformers(long_case):
    folder, prompt, want_tokens, want_lp, last_logits = long_case
    tokens, got_lp, first_top, _ = run_engine(folder, prompt, "bfloat16")
    err = (got_lp - want_lp).abs()
    # the first sampled token's top-20 logprobs against the reference's, at the same ids
    ref_lp = torch.log_softmax(last_logits, dim=-1)
    top = first_top[0]["top_logprobs"]
    ids = torch.tensor([t for t, _ in top])
    top_err = (torch.tensor([lp for _, lp in top]) - ref_lp[ids]).abs().max().item()
    same = sum(a == b for a, b in zip(tokens, want_tokens))
    print(f"bfloat16 32k: prompt logprob abs error max {err.max():.2e} mean {err.mean():.2e}; "
          f"first-token top-20 logprob abs error max {top_err:.2e}; greedy agreement {same}/{MAX_NEW}")
    assert err.mean().item() < 0.05
    assert top_err < 0.25

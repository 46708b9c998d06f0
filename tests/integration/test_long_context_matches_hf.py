"""Long prompts with scaled RoPE equal transformers: a prompt many times the model's original
window, prefilled in many chunks, gives the same greedy tokens and the same logprob at every
prompt position as transformers on the same weights.

Tiny random-weight models: a Llama with Llama-3.1's rope scaling (original window 256,
factor 8) and a Qwen2 with YaRN (original window 512, factor 8, as Qwen2.5 ships it), each
with a 2,048-token prompt in 256-token chunks (8 prefill steps, most of the prompt beyond the
original window). The rope tables themselves are checked bit for bit against transformers'
`rope_init_fn`s.
"""
import random

import pytest
import torch

from baton.services.engine import SamplingParams
from baton.services.engine.models.model_config import _rope_config
from baton.services.engine.models.rotary import RotaryEmbedding
from tests.helpers.tiny_models import VOCAB, hf_greedy, load_hf, make_tiny_model

PROMPT_LEN = 2048
CHUNK = 256
MAX_NEW = 12

ROPES = {
    "llama3": ("llama3_rope", dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=256)),
    "yarn": ("qwen2", dict(rope_type="yarn", rope_theta=1000000.0, factor=8.0,
                           original_max_position_embeddings=512)),
}


@pytest.fixture(scope="module", params=sorted(ROPES))
def long_model(request, tmp_path_factory):
    """(folder, transformers reference) of a tiny model with a scaled rope and a 4,096-token window."""
    family, rope = ROPES[request.param]
    folder = make_tiny_model(family, tmp_path_factory.mktemp(request.param), seed=11,
                             max_position_embeddings=4096, rope_parameters=dict(rope))
    return folder, load_hf(folder)


def test_rope_tables_equal_transformers(long_model):
    folder, hf = long_model
    head_dim = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads
    ours = RotaryEmbedding(_rope_config(hf.config.to_dict()), head_dim)
    theirs = hf.model.rotary_emb
    assert torch.equal(ours.inv_freq, theirs.inv_freq)
    positions = torch.arange(PROMPT_LEN)
    cos, sin = ours.cos_sin(positions, torch.float32)
    ref_cos, ref_sin = theirs(torch.zeros(1, 1, 1), positions[None])
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


def test_chunked_long_prompt_equals_transformers(long_model, make_llm):
    folder, hf = long_model
    rng = random.Random(12)
    prompt = [rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN)]
    llm = make_llm(folder, page_size=16, kv_cache_tokens=4096, chunked_prefill_size=CHUNK,
                   max_num_batched_tokens=CHUNK)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, prompt_logprobs=0)
    prefill_steps = []
    llm.engine.add_request("long", prompt, params)
    deltas = []
    while llm.engine.has_unfinished():
        deltas.extend(llm.engine.step())
        prefill_steps += [n for _, _, n in llm.engine.last_schedule if n > 1]
    deltas.extend(llm.engine.flush())
    assert len(prefill_steps) == -(-PROMPT_LEN // CHUNK) and max(prefill_steps) == CHUNK
    tokens = [t for d in deltas for t in d.new_token_ids]
    assert tokens == hf_greedy(hf, prompt, MAX_NEW, ignore_eos=True)
    entries = [e for d in deltas for e in (d.prompt_logprobs or [])]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert [e["token_id"] for e in entries] == prompt[1:]
    got = torch.tensor([e["logprob"] for e in entries])
    assert (got - reference).abs().max().item() < 1e-4

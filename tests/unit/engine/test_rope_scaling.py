"""RoPE scaling read from config.json equals transformers' `rope_init_fn`s bit for bit: the
inverse frequencies and the attention factor of default / linear / llama3 / yarn configs,
including the spellings real checkpoints use (rope_scaling with `type`, a missing
original_max_position_embeddings, YaRN's mscale pair, Qwen2.5's factor 4 over 32k)."""
import pytest
import torch

from baton.services.engine.models.model_config import _rope_config
from baton.services.engine.models.rotary import RotaryEmbedding, inverse_frequencies

CASES = {
    "default": dict(rope_theta=10000.0),
    "linear": dict(rope_scaling=dict(type="linear", factor=4.0)),
    "llama3.1": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8192), rope_theta=500000.0),
    "llama3_no_original": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0), rope_theta=500000.0),
    "qwen2.5_yarn": dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32768),
                         rope_theta=1000000.0, max_position_embeddings=131072),
    "yarn_mscale": dict(rope_scaling=dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.707),
                        rope_theta=10000.0, max_position_embeddings=163840),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_scaling_equals_transformers(name):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    options = dict(hidden_size=512, num_attention_heads=4, max_position_embeddings=8192) | CASES[name]
    config = transformers.LlamaConfig(**options)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        want, factor = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128)), 1.0
    else:
        want, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    rope = _rope_config(config.to_dict())
    assert rope.rope_type == rope_type
    assert torch.equal(inverse_frequencies(rope, 128), want)
    assert rope.attention_factor == pytest.approx(factor, rel=1e-12)
    cos, sin = RotaryEmbedding(rope, 128).cos_sin(torch.tensor([0, 1, 5000]), torch.float32)
    assert cos[0, 0].item() == pytest.approx(factor) and sin[0].abs().max().item() == 0.0


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ValueError, match="longrope"):
        _rope_config(dict(rope_scaling=dict(rope_type="longrope", factor=2.0)))

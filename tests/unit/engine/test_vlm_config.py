"""Reading vision-language model folders: the decoder's config from nested and flat layouts,
and checkpoint tensor names of every layout mapped to the language and vision modules."""
import pytest

from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.models.vlm import language_tensor_name, vision_tensor_name
from baton.services.engine.multimodal.image_encoder import expand_prompt

TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, eos_token_id=2)


def test_llava_reads_its_text_config():
    cfg = ModelConfig.from_dict({"architectures": ["LlavaForConditionalGeneration"], "image_token_index": 99,
                                 "text_config": dict(TEXT, model_type="llama"), "vision_config": {}})
    assert (cfg.family, cfg.multimodal, cfg.image_token_id, cfg.num_kv_heads) == ("llama", "llava", 99, 2)
    assert cfg.mrope_section == () and not cfg.attention_bias and cfg.eos_token_ids == (2,)


def test_qwen2_5_vl_flat_layout_with_mrope_scaling():
    """Released Qwen2.5-VL checkpoints keep the text fields at the top level, rope_scaling type mrope."""
    raw = dict(TEXT, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
               image_token_id=97, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
               vision_config={}, tie_word_embeddings=True)
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.family, cfg.multimodal, cfg.image_token_id) == ("qwen2", "qwen2_5_vl", 97)
    assert cfg.mrope_section == (2, 3, 3) and cfg.rope.theta == 1e6 and cfg.attention_bias and cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig.from_dict(dict(raw, rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]}))


@pytest.mark.parametrize("stored, language, vision", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight", None),
    ("language_model.lm_head.weight", "lm_head.weight", None),
    ("model.language_model.norm.weight", "model.norm.weight", None),
    ("model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias", None),
    ("lm_head.weight", "lm_head.weight", None),
    ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", None, "vision_tower.encoder.layers.0.mlp.fc1.weight"),
    ("model.vision_tower.embeddings.class_embedding", None, "vision_tower.embeddings.class_embedding"),
    ("multi_modal_projector.linear_1.bias", None, "multi_modal_projector.linear_1.bias"),
    ("model.visual.merger.ln_q.weight", None, "visual.merger.ln_q.weight"),
    ("visual.blocks.0.attn.qkv.weight", None, "visual.blocks.0.attn.qkv.weight"),
])
def test_tensor_names_of_every_layout(stored, language, vision):
    assert language_tensor_name(stored) == language
    assert vision_tensor_name(stored) == vision


def test_expand_prompt_places_one_token_per_embedding():
    assert expand_prompt([5, 9, 6, 9, 9, 9, 7], 9, [2, 3]) == ([5, 9, 9, 6, 9, 9, 9, 7], [1, 4])
    with pytest.raises(ValueError, match="run of 2"):
        expand_prompt([9, 9], 9, [3])
    with pytest.raises(ValueError, match="2 images but 1"):
        expand_prompt([5, 9], 9, [1, 1])

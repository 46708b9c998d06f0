"""Tiny random-weight Hugging Face models of each supported family, saved as real folders.

Each folder has config.json, model.safetensors, generation_config.json and a word-level
tokenizer covering the vocabulary, so the engine loads it through its normal loader and
transformers loads the very same weights as the reference.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

VOCAB = 384

BASE: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class name, overrides)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                        tie_word_embeddings=True,
                                        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                  tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                                      sliding_window=None, tie_word_embeddings=False)),
}


def word_tokenizer(vocab_size: int = VOCAB):
    """A word-level fast tokenizer with tokens w0..w{n-1} (ids 0..2 are unk/bos/eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_tiny_model(name: str, folder: Path, seed: int = 0, max_shard_size: str | None = None,
                    **overrides: Any) -> Path:
    """Build the named tiny model with random weights (seeded) and save it in `folder`
    (sharded with an index file when `max_shard_size` is given, e.g. "100KB")."""
    import transformers
    class_name, family_overrides = TINY_CONFIGS[name]
    config = getattr(transformers, class_name)(**{**BASE, **family_overrides, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def load_hf(folder: Path):
    """The transformers reference model for a folder, in float32."""
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """Reference: transformers' greedy `generate` on one unpadded prompt; the new tokens only.

    Stops at EOS (EOS included) like HF does, unless ignore_eos."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens = False, max_new_tokens
    config.temperature = config.top_p = config.top_k = None
    if ignore_eos:
        config.eos_token_id = [10**9]  # never produced: HF falls back to the model config on None
    with torch.no_grad():
        config.pad_token_id = 0
        out = model.generate(torch.tensor([prompt]), generation_config=config,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


# --- vision-language models -------------------------------------------------------------
IMAGE_TOKEN = {"llava": VOCAB - 1, "qwen2_5_vl": VOCAB - 4}
"""The image placeholder id of each tiny VLM (a word of the tokenizer: w383 / w380)."""


def make_tiny_vlm(name: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random-weight LLaVA-1.5 (CLIP tower 56 px / 14 px patches: 16 image tokens) or
    Qwen2.5-VL (window attention, 2x2 merge; 28 px per image token), saved with its image
    processor and word tokenizer."""
    import transformers
    text = {k: v for k, v in BASE.items() if k not in ("initializer_range",)}
    if name == "llava":
        config = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                        num_attention_heads=4, image_size=56, patch_size=14),
            text_config=transformers.LlamaConfig(**text, tie_word_embeddings=False),
            image_token_id=IMAGE_TOKEN[name], image_seq_length=16)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        model_class = transformers.LlavaForConditionalGeneration
    elif name == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(text, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[1]),
            image_token_id=IMAGE_TOKEN[name], video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 6,
            vision_end_token_id=VOCAB - 5, tie_word_embeddings=False)
        processor = transformers.Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16,
                                                       patch_size=14, merge_size=2, temporal_patch_size=2)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"no tiny VLM {name!r}")
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    with torch.no_grad():  # random weights of a visible scale, so images move the logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.chat_template = VLM_CHAT_TEMPLATE.replace("IMAGE", f"w{IMAGE_TOKEN[name]}")
    tokenizer.save_pretrained(folder)
    return folder


VLM_CHAT_TEMPLATE = ("{% for m in messages %}{% if m.content is string %}{{ m.content }} {% else %}"
                     "{% for p in m.content %}{% if p.type == 'image' %}IMAGE {% else %}{{ p.text }} {% endif %}"
                     "{% endfor %}{% endif %}{% endfor %}")
"""The tiny VLMs' chat template: every message's text and image parts in order, space-separated
(an image part is the placeholder word)."""


def load_hf_vlm(folder: Path):
    """The transformers reference VLM for a folder, in float32."""
    import transformers
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def hf_vlm_greedy(model, prompt: list[int], images: list, max_new_tokens: int) -> list[int]:
    """Reference: transformers' greedy `generate` on one expanded prompt with its PIL images."""
    import transformers
    processor = transformers.AutoImageProcessor.from_pretrained(model.name_or_path)
    inputs = processor(images=images, return_tensors="pt") if images else {}
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), **inputs)
    if model.config.model_type == "qwen2_5_vl":
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens, config.pad_token_id = False, max_new_tokens, 0
    config.temperature = config.top_p = config.top_k = None
    config.eos_token_id = [10**9]
    with torch.no_grad():
        out = model.generate(ids, generation_config=config, **kwargs)
    return out[0, len(prompt):].tolist()


def tiny_image(seed: int, width: int = 56, height: int = 56, fmt: str = "PNG") -> bytes:
    """A random-noise image's encoded bytes (deterministic per seed)."""
    import io

    import numpy as np
    from PIL import Image
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()

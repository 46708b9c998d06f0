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

"""A tiny random-weight Llama that speaks the embedded SmolLM2 tokenizer's vocabulary.

The word-level tiny models (`tiny_models.py`) cannot spell JSON, so structured output,
stop strings and detokenization need a real byte-level BPE tokenizer: this folder pairs
SmolLM2's tokenizer files (49,152 ids, eos 2 = `<|im_end|>`) with tiny random weights, so a
step costs little more than the word-level model's on CPU.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers.tiny_models import make_tiny_model

SMOLLM2_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def make_text_tiny_model(folder: Path, tokenizer_source: Path, seed: int = 0) -> Path:
    """Build the tiny model in `folder` with the tokenizer of `tokenizer_source` (a HF folder)."""
    make_tiny_model("llama", folder, seed=seed, vocab_size=SMOLLM2_VOCAB, initializer_range=0.05)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_source / name, folder / name)
    return folder

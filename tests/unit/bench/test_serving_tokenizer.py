"""bench.serving.tokenizer: prompts of exact token lengths from real HF tokenizers (SmolLM2's
byte-level BPE and the tests' word-level tokenizer with a synthetic vocabulary), no shared
prefixes between distinct prompts, per-chunk token counts, and where the tokenizer comes from."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from baton.bench.serving.config import BenchConfig
from baton.bench.serving.datasets import build_dataset, warmup_sessions
from baton.bench.serving.tokenizer import (TokenPrompts, chunk_token_counts, load_tokenizer, resolve_tokenizer)
from baton.services.engine.default_model import DEFAULT_MODEL_NAME
from tests.helpers.tiny_models import word_tokenizer


@pytest.fixture(scope="module")
def smollm2(default_model_path):
    return load_tokenizer(str(default_model_path), local_only=True)


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def max_shared_prefix(token_lists):
    return max(common_prefix(a, b) for a, b in itertools.combinations(token_lists, 2))


@pytest.mark.parametrize("dataset, flags", [
    ("random", dict(input_len=300, input_len_min=1, output_len=8)),
    ("sharegpt-like", dict(sharegpt_max_input_len=512)),
])
def test_smollm2_prompts_have_exact_lengths_and_no_shared_prefix(smollm2, dataset, flags):
    prompts = TokenPrompts(smollm2)
    config = BenchConfig(dataset=dataset, num_prompts=120, **flags)
    sessions = build_dataset(config, seed=0, prompts=prompts)
    encoded = [ids(smollm2, s.user_turns[0]) for s in sessions]
    assert all(len(e) == s.input_lens[0] for e, s in zip(encoded, sessions))
    if dataset == "random":
        drawn = np.random.default_rng([0, 0]).integers(1, 301, size=120)  # the lengths the dataset draws
        assert [s.input_lens[0] for s in sessions] == drawn.tolist()
    assert len({tuple(e) for e in encoded}) == len(encoded)
    assert max_shared_prefix(encoded) <= prompts.digits - 1  # each starts with its own number
    assert build_dataset(config, seed=0, prompts=prompts) == sessions  # reproducible from the seed
    other = build_dataset(config, seed=1, prompts=prompts)
    assert max_shared_prefix([ids(smollm2, s.user_turns[0]) for s in [*sessions[:30], *other[:30]]]) <= 3


def test_word_level_tokenizer_with_a_synthetic_vocabulary():
    tok = word_tokenizer()
    words = build_dataset(BenchConfig(num_prompts=4, input_len=20), seed=0)  # English words: all <unk>
    assert {tuple(ids(tok, s.user_turns[0])) for s in words} == {(tok.unk_token_id,) * 20}
    prompts = TokenPrompts(tok)
    sessions = build_dataset(BenchConfig(num_prompts=50, input_len=40, range_ratio=0.1), seed=0, prompts=prompts)
    encoded = [ids(tok, s.user_turns[0]) for s in sessions]
    assert all(len(e) == s.input_lens[0] for e, s in zip(encoded, sessions))
    assert tok.unk_token_id not in {i for e in encoded for i in e}
    assert max_shared_prefix(encoded) <= prompts.digits - 1 and prompts.digits == 3  # 381 plain tokens


def test_shared_prefix_and_multi_turn_with_a_tokenizer(smollm2):
    prompts = TokenPrompts(smollm2)
    config = BenchConfig(dataset="shared-prefix", prefix_groups=3, prefix_len=64, questions_per_group=4,
                         input_len=16, output_len=2)
    sessions = build_dataset(config, seed=0, prompts=prompts)
    systems = {s.group: s.system for s in sessions}
    assert all(s.system == systems[s.group] for s in sessions) and len(set(systems.values())) == 3
    assert all(len(ids(smollm2, s.system)) == 64 and len(ids(smollm2, s.user_turns[0])) == 16
               and s.input_lens == (80,) for s in sessions)
    assert max_shared_prefix([ids(smollm2, s) for s in systems.values()]) <= 1
    turns = build_dataset(BenchConfig(dataset="multi-turn", sessions=2, turns=3, input_len=12), 0, prompts=prompts)
    assert all(len(ids(smollm2, t)) == 12 for s in turns for t in s.user_turns)
    warm = warmup_sessions(BenchConfig(num_prompts=5, input_len=30, warmup=3), 0, prompts)
    assert [len(ids(smollm2, s.user_turns[0])) for s in warm] == [30, 30, 30]


def test_chunk_token_counts(smollm2):
    texts = ["Hello", " world", ", how", " are you", "?"]
    counts = chunk_token_counts(smollm2, texts)
    assert sum(counts) == len(ids(smollm2, "".join(texts))) and counts == [1, 1, 2, 2, 1]
    assert chunk_token_counts(word_tokenizer(), ["w5 w6", " w7", " w8 w9 w10"]) == [2, 1, 3]
    assert chunk_token_counts(smollm2, []) == []


def test_resolve_tokenizer(default_model_path, tmp_path):
    assert resolve_tokenizer("none", DEFAULT_MODEL_NAME).tokenizer is None
    flag = resolve_tokenizer(str(default_model_path))
    assert flag.tokenizer is not None and flag.source == "--tokenizer"
    embedded = resolve_tokenizer("", DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME)
    assert embedded.tokenizer is not None and embedded.path == str(default_model_path)
    by_path = resolve_tokenizer("", "served-name", str(default_model_path))  # vLLM's /v1/models root
    assert by_path.source.startswith("/v1/models root") and by_path.tokenizer is not None
    word_tokenizer().save_pretrained(tmp_path / "words")
    local = resolve_tokenizer("", str(tmp_path / "words"))
    assert local.source.startswith("model id") and local.tokenizer.unk_token == "<unk>"
    unknown = resolve_tokenizer("", "no-such-model-anywhere")
    assert unknown.tokenizer is None and "English-word" in unknown.source
    with pytest.raises(ValueError, match="--tokenizer"):
        resolve_tokenizer(str(tmp_path / "missing"))

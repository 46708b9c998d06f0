"""Structured output via xgrammar: constrained decoding over random logits with the SmolLM2
tokenizer yields valid JSON / regex / EBNF text; bad specs fail clearly; the cache is LRU."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import jsonschema
import pytest
import torch

from baton.services.engine.sampling_params import StructuredOutputParams
from baton.services.engine.sampling.structured_output import (
    GrammarCompilerCache,
    GrammarState,
    StructuredOutputError,
    allocate_bitmask,
    apply_bitmask,
)

VOCAB = 49152  # SmolLM2's logits width
EOS = 2  # <|im_end|>
MAX_TOKENS = 1500

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10}, "active": {"type": "boolean"}},
            "required": ["name", "active"],
        },
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4},
    },
    "required": ["id", "owner", "scores"],
}
CHOICE = {
    "type": "object",
    "properties": {
        "kind": {"const": "point"},
        "value": {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "string", "pattern": "^[a-z]{3}$"}]},
    },
    "required": ["kind", "value"],
}
EBNF = """
root ::= "Answer: " answer "."
answer ::= "yes" | "no" | number
number ::= [1-9] [0-9]*
"""


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path, local_files_only=True)


@pytest.fixture(scope="module")
def cache(tokenizer: Any) -> GrammarCompilerCache:
    return GrammarCompilerCache(tokenizer, VOCAB, stop_token_ids=[EOS])


def allowed(bitmask: torch.Tensor, row: int, token_id: int) -> bool:
    return bool((int(bitmask[row, token_id // 32]) >> (token_id % 32)) & 1)


def decode_constrained(cache: GrammarCompilerCache, tokenizer: Any, spec: StructuredOutputParams, seed: int,
                       bias: Optional[torch.Tensor] = None) -> str:
    """Greedy decoding over seeded random logits (plus `bias`) under the spec's mask."""
    state = cache.new_state(spec)
    generator = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, cache.vocab_size)
    tokens: list[int] = []
    for _ in range(MAX_TOKENS):
        logits = torch.randn(1, cache.vocab_size, generator=generator)
        if bias is not None:
            logits += bias
        state.fill_bitmask(bitmask, 0)
        apply_bitmask(logits, bitmask)
        token_id = int(logits.argmax())
        assert state.accept(token_id)
        if token_id == EOS:
            break
        tokens.append(token_id)
    assert state.is_terminated(), f"no EOS within {MAX_TOKENS} tokens"
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("schema", [PERSON, NESTED, CHOICE], ids=["person", "nested", "choice"])
def test_json_schema_output_validates(cache, tokenizer, schema: dict, seed: int) -> None:
    text = decode_constrained(cache, tokenizer, StructuredOutputParams(json=json.dumps(schema)), seed)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_object_output_is_an_object(cache, tokenizer, seed: int) -> None:
    # Unbiased random logits wander for thousands of tokens inside strings; a mild bias
    # towards tokens containing a quote or closing bracket keeps the walk short.
    closing = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(VOCAB)))) if set(t) & set('"}]')]
    bias = torch.zeros(VOCAB)
    bias[closing] = 1.0
    text = decode_constrained(cache, tokenizer, StructuredOutputParams(json_object=True), seed, bias)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("pattern", [r"\d{4}-\d{2}-\d{2}", r"\(\d{3}\) \d{3}-\d{4}", r"(cat|dog)s? [a-z]{2,5}!"])
@pytest.mark.parametrize("seed", [0, 1])
def test_regex_output_matches(cache, tokenizer, pattern: str, seed: int) -> None:
    text = decode_constrained(cache, tokenizer, StructuredOutputParams(regex=pattern), seed)
    assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ebnf_output_derives(cache, tokenizer, seed: int) -> None:
    text = decode_constrained(cache, tokenizer, StructuredOutputParams(grammar=EBNF), seed)
    assert re.fullmatch(r"Answer: (yes|no|[1-9][0-9]*)\.", text), text


def test_eos_only_when_complete(cache, tokenizer) -> None:
    state = cache.new_state(StructuredOutputParams(regex=r"\d{4}-\d{2}-\d{2}"))
    bitmask = allocate_bitmask(1, VOCAB)
    state.fill_bitmask(bitmask, 0)
    assert not allowed(bitmask, 0, EOS)
    assert not state.accept(EOS) and not state.is_terminated()
    for token_id in tokenizer.encode("2024-01-15", add_special_tokens=False):
        state.fill_bitmask(bitmask, 0)
        assert allowed(bitmask, 0, token_id)
        assert state.accept(token_id)
    state.fill_bitmask(bitmask, 0)
    only = [i for i in range(VOCAB) if allowed(bitmask, 0, i)]
    assert only == [EOS]  # the grammar cannot continue: only the stop token is left
    assert state.accept(EOS) and state.is_terminated()
    state.fill_bitmask(bitmask, 0)  # a terminated state still fills a well-defined row
    assert [i for i in range(VOCAB) if allowed(bitmask, 0, i)] == [EOS]


def test_special_tokens_never_allowed_inside_strings(cache, tokenizer) -> None:
    state = cache.new_state(StructuredOutputParams(json_object=True))
    for token_id in tokenizer.encode('{"a": "', add_special_tokens=False):
        assert state.accept(token_id)
    bitmask = allocate_bitmask(1, VOCAB)
    state.fill_bitmask(bitmask, 0)
    for token_id in (0, 1, EOS, 3):  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>
        assert not allowed(bitmask, 0, token_id)
    assert allowed(bitmask, 0, tokenizer.convert_tokens_to_ids("hello"))


def test_rollback_restores_the_state(cache, tokenizer) -> None:
    spec = StructuredOutputParams(regex=r"\d{4}-\d{2}-\d{2}")
    state = cache.new_state(spec)
    ids = tokenizer.encode("2024-01-15", add_special_tokens=False)
    for token_id in ids:
        assert state.accept(token_id)
    state.rollback(3)
    for token_id in ids[-3:]:
        assert state.accept(token_id)
    assert state.accept(EOS) and state.is_terminated()
    state.rollback(1)
    assert not state.is_terminated()
    with pytest.raises(ValueError, match="rollback"):
        state.rollback(100)


def test_apply_bitmask_leaves_unconstrained_rows_untouched(cache, tokenizer) -> None:
    bitmask = allocate_bitmask(3, VOCAB)
    assert bitmask.dtype == torch.int32 and bitmask.shape == (3, VOCAB // 32)
    cache.new_state(StructuredOutputParams(regex=r"\d+")).fill_bitmask(bitmask, 0)
    cache.new_state(StructuredOutputParams(regex=r"[ab]")).fill_bitmask(bitmask, 2)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits[1], before[1])
    for row in (0, 2):
        kept = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert kept and all(allowed(bitmask, row, i) for i in kept)
        assert torch.equal(logits[row, kept], before[row, kept])
    assert set(tokenizer.decode([i]) for i in torch.isfinite(logits[2]).nonzero().flatten().tolist()) == {"a", "b"}
    untouched = logits.clone()
    apply_bitmask(untouched, allocate_bitmask(3, VOCAB))
    assert torch.equal(untouched, logits)
    with pytest.raises(ValueError):
        apply_bitmask(logits, allocate_bitmask(3, VOCAB - 64))


def test_padded_vocab_masks_the_padding(tokenizer) -> None:
    padded = VOCAB + 64
    cache = GrammarCompilerCache(tokenizer, padded)  # stop ids default to the tokenizer's eos
    assert cache.stop_token_ids == (EOS,)
    bitmask = allocate_bitmask(1, padded)
    state = cache.new_state(StructuredOutputParams(json_object=True))
    assert state.accept(tokenizer.convert_tokens_to_ids("{"))
    state.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, padded)
    apply_bitmask(logits, bitmask)
    assert torch.isinf(logits[0, VOCAB:]).all()


@pytest.mark.parametrize(
    "spec, kind, reason",
    [
        (StructuredOutputParams(json='{"type": "nosuchtype"}'), "JSON schema", "nosuchtype"),
        (StructuredOutputParams(json='{"type": "object", '), "JSON schema", "not valid JSON"),
        (StructuredOutputParams(json="[1, 2]"), "JSON schema", "object or boolean"),
        (StructuredOutputParams(regex="(["), "regex", "Unclosed"),
        (StructuredOutputParams(grammar='root ::= "a" undefined_rule'), "EBNF grammar", "undefined_rule"),
        (StructuredOutputParams(grammar='root ::= "a" |'), "EBNF grammar", "line 1"),
    ],
    ids=["bad-type", "bad-json", "not-object", "regex", "ebnf-undefined", "ebnf-syntax"],
)
def test_invalid_specs_raise_clear_errors(cache, spec: StructuredOutputParams, kind: str, reason: str) -> None:
    with pytest.raises(StructuredOutputError) as caught:
        cache.compile(spec)
    message = str(caught.value)
    assert message.startswith(f"invalid {kind}: ") and reason in message, message
    assert isinstance(caught.value, ValueError)
    assert "/project/cpp" not in message  # xgrammar's C++ log prefix is stripped


def test_same_spec_compiles_once(cache) -> None:
    spec = StructuredOutputParams(json=json.dumps(PERSON))
    assert cache.compile(spec) is cache.compile(StructuredOutputParams(json=json.dumps(PERSON)))
    assert isinstance(cache.new_state(spec), GrammarState)


def test_lru_bound_evicts_least_recently_used(tokenizer) -> None:
    small = GrammarCompilerCache(tokenizer, VOCAB, max_entries=2)
    a, b, c = (StructuredOutputParams(regex=r) for r in ("a+", "b+", "c+"))
    first_a = small.compile(a)
    first_b = small.compile(b)
    assert small.compile(a) is first_a  # a is now the most recently used
    small.compile(c)  # evicts b
    assert len(small) == 2
    assert small.compile(a) is first_a
    assert small.compile(b) is not first_b

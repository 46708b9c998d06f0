"""IncrementalDetokenizer on a tiny byte-level BPE tokenizer trained inside the test, on each path."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from baton.services.engine.output.detokenizer import PATHS, IncrementalDetokenizer

EOS = "<|endoftext|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello streaming text and tokens.",
    "A byte level tokenizer splits rare characters into bytes.",
] * 20
MIXED_TEXT = "Hello 世界! こんにちは 🎉👍🏽 café — naïve 🤖 done"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


@pytest.fixture(params=PATHS)
def path(request) -> str:
    """Every test runs on each detokenizer path (all three apply to this fast tokenizer)."""
    return request.param


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int], skip: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finish())
    return deltas


def test_multibyte_characters_are_never_emitted_half(path: str, tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
    # the test is only meaningful if some characters really are split over several tokens
    assert any("\ufffd" in decode(tokenizer, [i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, path=path)
    deltas = stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == decode(tokenizer, ids) == MIXED_TEXT
    assert sum(1 for d in deltas if d == "") > 0  # bytes of a partial character were held back
    assert detok.output_token_ids == ids


def test_one_token_per_byte_emits_each_character_whole(path: str, tokenizer: PreTrainedTokenizerFast) -> None:
    text = "a🎉世"
    # the byte-level pre-tokenizer maps each UTF-8 byte to one alphabet symbol: one id per byte
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    symbols = "".join(piece for piece, _ in pieces)
    byte_ids = tokenizer.convert_tokens_to_ids(list(symbols))
    assert len(byte_ids) == 1 + 4 + 3
    detok = IncrementalDetokenizer(tokenizer, path=path)
    deltas = [detok.add(i) for i in byte_ids]
    assert deltas == ["a", "", "", "", "🎉", "", "", "世"]
    assert detok.finish() == ""
    assert detok.text == text


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_flag(path: str, tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids = tokenizer.encode("Hello 世界", add_special_tokens=False) + [eos_id]
    ids += tokenizer.encode(" again 🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, path=path, skip_special_tokens=skip)
    deltas = stream(detok, ids)
    assert "".join(deltas) == decode(tokenizer, ids, skip)
    assert (EOS in detok.text) is (not skip)
    assert all("\ufffd" not in d for d in deltas)


def test_prompt_context_is_not_emitted(path: str, tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = tokenizer.encode("The quick brown 世", add_special_tokens=False)
    output = tokenizer.encode(" fox 👍🏽 jumps", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, path=path, prompt_token_ids=prompt)
    deltas = stream(detok, output)
    assert "".join(deltas) == decode(tokenizer, output) == " fox 👍🏽 jumps"
    assert all("\ufffd" not in d for d in deltas)


def test_finish_flushes_a_trailing_partial_character(path: str, tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    full = decode(tokenizer, ids)
    truncated = ids[:-1]  # the emoji's last byte never comes
    expected = decode(tokenizer, truncated)
    assert expected.endswith("\ufffd") and full == "ok 🎉"
    detok = IncrementalDetokenizer(tokenizer, path=path)
    streamed = "".join(detok.add(i) for i in truncated)
    assert "\ufffd" not in streamed
    tail = detok.finish()
    assert tail.endswith("\ufffd")
    assert streamed + tail == detok.text == expected
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.add(ids[-1])


def test_empty_stream(path: str, tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, path=path, prompt_token_ids=[1, 2, 3])
    assert detok.finish() == "" and detok.text == ""

"""IncrementalDetokenizer's three paths (stream / direct / slow) give the same deltas.

Real tokenizers: the embedded SmolLM2 one (byte-level BPE), the word-level tokenizer of the
tiny test models (WordPiece decoder, which depends on the window's first token), and a
Llama-2-style one trained here (Metaspace, byte fallback, Strip decoder). Random id sequences
mix encoded text with emoji / CJK, raw vocabulary ids (partial UTF-8 bytes included) and
special tokens, with and without prompt context, for both skip_special_tokens settings.
"""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from baton.services.engine.output.detokenizer import PATHS, IncrementalDetokenizer
from baton.services.engine.output.stop_checker import StopStringChecker
from tests.helpers.tiny_models import word_tokenizer

SNIPPETS = ["Hello 世界!", " こんにちは", " 🎉👍🏽", " café — naïve", " 🤖 done.", " The quick brown fox",
            " jumps over", " 中文字符", " ok", "\n\n", " 12345", " ñandú"]


@pytest.fixture(scope="module")
def smollm2(default_model_path):
    return AutoTokenizer.from_pretrained(str(default_model_path))


@pytest.fixture(scope="module")
def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-2-style: Metaspace pre-tokenizer, BPE with <0xXX> byte fallback, Strip decoder."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["The quick brown fox jumps over the lazy dog. Hello world, hello text."] * 20,
                                trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers_by_name(smollm2, sentencepiece_like):
    return {"smollm2": smollm2, "word": word_tokenizer(), "sentencepiece": sentencepiece_like}


def random_ids(tokenizer, rng: random.Random, length: int = 40) -> list[int]:
    specials = sorted(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    ids: list[int] = []
    while len(ids) < length:
        kind = rng.random()
        if kind < 0.5:
            ids += tokenizer.encode(rng.choice(SNIPPETS), add_special_tokens=False)
        elif kind < 0.85:
            ids.append(rng.randrange(vocab))
        else:
            ids.append(rng.choice(specials))
    return ids[:length]


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.finish()]


def all_paths(tokenizer, ids, skip, prompt=()) -> dict[str, list[str]]:
    return {path: stream(IncrementalDetokenizer(tokenizer, skip, prompt, path=path), ids) for path in PATHS}


@pytest.mark.parametrize("name", ["smollm2", "word", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_paths_give_identical_deltas(tokenizers_by_name, name, skip):
    tokenizer = tokenizers_by_name[name]
    rng = random.Random(f"{name}-{skip}")
    for trial in range(25):
        ids = random_ids(tokenizer, rng)
        prompt = random_ids(tokenizer, rng, 8) if trial % 2 else []
        by_path = all_paths(tokenizer, ids, skip, prompt)
        assert by_path["stream"] == by_path["direct"] == by_path["slow"], (ids, prompt)
        # byte-level BPE: the context changes nothing; byte fallback turns each byte of an invalid
        # run into its own U+FFFD, so there random bytes split differently from a whole decode
        if name == "smollm2" or (name == "word" and not prompt):
            expected = tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert "".join(by_path["stream"]) == expected, (ids, prompt)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_path_on_multibyte_text_and_specials(smollm2, skip):
    eos = smollm2.eos_token_id
    ids = []
    for snippet in SNIPPETS:
        ids += smollm2.encode(snippet, add_special_tokens=False) + [eos]
    detok = IncrementalDetokenizer(smollm2, skip, prompt_token_ids=smollm2.encode("Say hi:"))
    assert detok.path == "stream"
    deltas = stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # partial characters were held back
    assert "".join(deltas) == detok.text == smollm2.decode(ids, skip_special_tokens=skip)
    assert (smollm2.eos_token in detok.text) is (not skip)
    assert deltas == all_paths(smollm2, ids, skip, smollm2.encode("Say hi:"))["slow"]


def test_path_choice(smollm2):
    emoji = smollm2.encode("🎉", add_special_tokens=False)
    assert len(emoji) > 1
    assert IncrementalDetokenizer(smollm2).path == "stream"
    assert IncrementalDetokenizer(smollm2, prompt_token_ids=smollm2.encode("Hi there")).path == "stream"
    # a prompt ending mid-character, or one whose context text is empty (skipped specials)
    assert IncrementalDetokenizer(smollm2, prompt_token_ids=emoji[:-1]).path == "direct"
    specials = [smollm2.eos_token_id] * 5
    assert IncrementalDetokenizer(smollm2, True, specials).path == "direct"
    assert IncrementalDetokenizer(smollm2, False, specials).path == "stream"
    assert IncrementalDetokenizer(smollm2, path="slow").path == "slow"

    class OwnDecode(PreTrainedTokenizerFast):
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).upper()

    custom = OwnDecode(tokenizer_object=smollm2.backend_tokenizer)
    detok = IncrementalDetokenizer(custom)
    assert detok.path == "slow"
    assert "".join(stream(detok, smollm2.encode("hi there", add_special_tokens=False))) == "HI THERE"
    with pytest.raises(ValueError):
        IncrementalDetokenizer(custom, path="stream")
    with pytest.raises(ValueError):
        IncrementalDetokenizer(smollm2, path="fast")


def test_prompt_ending_mid_character_matches_slow(smollm2):
    prompt = smollm2.encode("Look 🎉", add_special_tokens=False)[:-1]
    ids = smollm2.encode(" and 世界", add_special_tokens=False)
    by_path = all_paths(smollm2, ids, True, prompt)
    assert by_path["stream"] == by_path["direct"] == by_path["slow"]
    assert IncrementalDetokenizer(smollm2, True, prompt).path == "direct"


def test_invalid_prefix_turns_stream_into_direct():
    """A decoder whose text does not extend its earlier text ("a", "ab" -> "X"): a forced
    DecodeStream raises; the request carries on in Python and emits what the slow path does."""
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1, "b": 2, "c": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert IncrementalDetokenizer(tokenizer).path == "direct"  # Fuse then a 2-char Replace: not chosen
    detok = IncrementalDetokenizer(tokenizer, path="stream")
    assert detok.path == "stream"
    ids = [1, 2, 3, 1, 3, 2]
    deltas = stream(detok, ids)
    assert detok.path == "direct"
    assert deltas == all_paths(tokenizer, ids, True)["slow"] == ["a", "", "c", "a", "c", "b", ""]


def test_resumed_replay_gives_the_same_deltas(smollm2):
    """A migrated stream replays the sent ids into a fresh detokenizer, then goes on."""
    rng = random.Random(7)
    prompt = smollm2.encode("Q:", add_special_tokens=False)
    ids = random_ids(smollm2, rng, 60)
    unbroken = stream(IncrementalDetokenizer(smollm2, True, prompt), ids)
    for cut in (1, 13, 37):
        replayed = IncrementalDetokenizer(smollm2, True, prompt)
        sent = "".join(replayed.add(i) for i in ids[:cut])
        rest = [replayed.add(i) for i in ids[cut:]] + [replayed.finish()]
        assert sent == "".join(unbroken[:cut]) and rest == unbroken[cut:]


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_at_the_same_place(smollm2, include):
    rng = random.Random(include)
    for _ in range(10):
        ids = []
        while len(ids) < 50:
            ids += smollm2.encode(rng.choice(SNIPPETS), add_special_tokens=False)
        text = smollm2.decode(ids)
        start = rng.randrange(len(text) - 4)
        stop = text[start:start + rng.randint(1, 4)]
        outputs = {}
        for path in PATHS:
            detok = IncrementalDetokenizer(smollm2, True, (), path=path)
            checker = StopStringChecker([stop, "\x00never"], include)
            emitted = ""
            for token in ids:
                piece, stopped = checker.feed(detok.add(token))
                emitted += piece
                if stopped:
                    break
            outputs[path] = emitted
        cut = text.find(stop) + (len(stop) if include else 0)
        assert outputs["stream"] == outputs["direct"] == outputs["slow"] == text[:cut], stop

"""The served model's tokenizer for `baton bench`: finding it, prompts of exact token lengths,
and how many tokens each streamed chunk carried when the server does not say.

- `resolve_tokenizer`: `--tokenizer PATH` (a local Hugging Face folder or a hub id; "none"
  turns it off), else the model the bench talks to when it is found without the network:
  the model id or /v1/models' `root` when one is a local folder, the id in the local HF
  cache, or Baton's embedded default model when that is the served name. Without one the
  datasets use English words (`datasets.WORDS`, one token each in GPT-2-style vocabularies).
- `TokenPrompts`: vLLM's recipe for random prompts: random token ids, decoded to text,
  re-encoded and trimmed or padded until the text is exactly N tokens. The ids come from a
  pool of clean tokens (no special tokens, printable, each one surviving decode-then-encode
  alone; leading-space word pieces when the vocabulary has enough of them, so the joined
  text re-encodes to the same ids). Each prompt starts with `digits` tokens that spell its
  own number, so two prompts of one workload never share more than `digits - 1` tokens.
- `chunk_token_counts`: tokens per chunk from one encode of the whole output with offsets
  (a token counts for the chunk where its text ends; a chunk can get 0).
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

MIN_SPACED_POOL = 1000
"""Use only leading-space word pieces when the vocabulary has at least this many."""
UNIQUE_PROMPTS = 10 ** 6
"""The prompt-number prefix is long enough to tell this many prompts apart."""
MAX_ROUNDS = 16
"""Decode / re-encode rounds before a prompt keeps the length it has (almost never reached)."""


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer a run uses (None: English-word prompts) and where it came from."""

    tokenizer: Any
    path: str
    source: str


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, local_only: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained(path)`, cached per path."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=local_only)


def resolve_tokenizer(flag: str, model: str = "", root: Optional[str] = None) -> TokenizerChoice:
    """The tokenizer of `--tokenizer` or else of the served model (see the module doc)."""
    flag = flag.strip()
    if flag.lower() == "none":
        return TokenizerChoice(None, "", "off (--tokenizer none)")
    if flag:
        try:
            return TokenizerChoice(load_tokenizer(flag), flag, "--tokenizer")
        except Exception as error:  # noqa: BLE001 - any loading failure is the flag's fault
            raise ValueError(f"--tokenizer {flag!r}: no tokenizer could be loaded ({type(error).__name__}: "
                             f"{error})") from None
    candidates: list[tuple[str, str]] = []
    for name, source in ((model, "model id (local folder)"), (root, "/v1/models root (local folder)")):
        if name and Path(name).expanduser().is_dir():
            candidates.append((str(Path(name).expanduser()), source))
    if model and not Path(model).expanduser().exists():
        candidates.append((model, "model id (local HF cache)"))
    from baton.services.engine.default_model import DEFAULT_MODEL_NAME, default_model_dir, is_converted
    if DEFAULT_MODEL_NAME in (model, root) and is_converted(default_model_dir()):
        candidates.append((str(default_model_dir()), "Baton's embedded default model"))
    for path, source in candidates:
        try:
            return TokenizerChoice(load_tokenizer(path, local_only=True), path, source)
        except Exception:  # noqa: BLE001 - not a tokenizer here: try the next place
            continue
    return TokenizerChoice(None, "", "none found (English-word prompts; pass --tokenizer)")


_POOLS: dict[int, np.ndarray] = {}


def clean_token_pool(tokenizer: Any) -> np.ndarray:
    """The ids random prompts are drawn from (see the module doc), shuffled with a fixed seed."""
    key = id(tokenizer)
    if key in _POOLS:
        return _POOLS[key]
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    back = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ok = [(i, t) for i, t, b in zip(ids, texts, back) if list(b) == [i] and t.strip() and t.isprintable()]
    spaced = [i for i, t in ok if t[0] == " " and t[1:].isalpha()]
    pool = spaced if len(spaced) >= MIN_SPACED_POOL else [i for i, t in ok if not any(c.isspace() for c in t.strip())]
    if len(pool) < 2:
        raise ValueError("the tokenizer has fewer than 2 plain tokens to build prompts from")
    _POOLS[key] = np.random.default_rng(0).permutation(np.asarray(pool, dtype=np.int64))
    return _POOLS[key]


class TokenPrompts:
    """Prompts of exact token lengths from a tokenizer (see the module doc)."""

    source = "tokenizer"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pool = clean_token_pool(tokenizer)
        self.digits = 1
        while len(self.pool) ** self.digits < UNIQUE_PROMPTS:
            self.digits += 1

    def count(self, text: str) -> int:
        """Tokens of `text` (no special tokens)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    def bind(self, rng: np.random.Generator) -> Callable[[int], tuple[str, int]]:
        """A maker of numbered prompts for one workload: `make(n)` is (text, tokens), tokens == n
        unless MAX_ROUNDS did not suffice. The numbering starts at a random offset from `rng`."""
        state = {"number": int(rng.integers(0, len(self.pool) ** self.digits))}

        def make(n: int) -> tuple[str, int]:
            if n <= 0:
                return "", 0
            number, state["number"] = state["number"], state["number"] + 1
            return self.exact(rng, [*self.number_ids(number)[:n], *self.draw(rng, n - self.digits)], n)
        return make

    def number_ids(self, number: int) -> list[int]:
        """`digits` ids that spell `number` in base len(pool), lowest digit first."""
        base = len(self.pool)
        return [int(self.pool[(number // base ** j) % base]) for j in range(self.digits)]

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(i) for i in self.pool[rng.integers(0, len(self.pool), size=max(0, n))]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def exact(self, rng: np.random.Generator, ids: list[int], n: int) -> tuple[str, int]:
        """Decode `ids`, re-encode, trim or pad with drawn ids, until the text is `n` tokens."""
        text = self.decode(ids)
        for _ in range(MAX_ROUNDS):
            got = self.tokenizer.encode(text, add_special_tokens=False)
            if len(got) == n:
                return text, n
            ids = list(got[:n]) if len(got) > n else [*got, *self.draw(rng, n - len(got))]
            text = self.decode(ids)
        return text, self.count(text)


def chunk_token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """How many tokens each chunk of `texts` carried (see the module doc)."""
    if not texts:
        return []
    ends = list(np.cumsum([len(t) for t in texts]))
    try:
        offsets = tokenizer("".join(texts), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer: no offsets
        return [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    counts = [0] * len(texts)
    for start, end in offsets:
        counts[min(bisect.bisect_left(ends, max(end, start + 1)), len(texts) - 1)] += 1
    return counts

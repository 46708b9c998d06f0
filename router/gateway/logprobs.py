"""Token logprobs in OpenAI's two shapes.

- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}`;
- completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`
  where each `top_logprobs` dict holds the sampled token and the alternatives (OpenAI: "up to
  logprobs+1 elements") and `text_offset` counts characters from the completion's start.

`TokenStrings` turns a token id into its text and exact bytes: byte-level BPE tokens (GPT-2,
Llama 3, Qwen, SmolLM2) map back through the GPT-2 byte alphabet, SentencePiece byte-fallback
tokens (`<0xE2>`) are their byte, so a token holding part of a UTF-8 character still has its
true `bytes` (its `token` text then shows U+FFFD, as OpenAI's does). Logprobs of masked tokens
(-inf) are clamped to -9999.0 so the JSON stays valid.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional

from baton.protos.baton.v1 import common_pb2

MIN_LOGPROB = -9999.0
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table (printable stand-ins for all 256 bytes)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def clamp(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) or logprob < MIN_LOGPROB else float(logprob)


class TokenStrings:
    """Token id -> (text, bytes), cached (the cache is bounded by the vocabulary)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(getattr(tokenizer, "all_special_tokens", []) or [])
        self._cache: dict[int, tuple[str, bytes]] = {}

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            return text, text.encode("utf-8")
        if piece in self._special:
            return piece, piece.encode("utf-8")
        match = _BYTE_FALLBACK.fullmatch(piece)
        if match:
            raw = bytes([int(match.group(1), 16)])
        elif self._byte_level and all(c in _BYTE_DECODER for c in piece):
            raw = bytes(_BYTE_DECODER[c] for c in piece)
        else:
            raw = piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece word marker
        return raw.decode("utf-8", errors="replace"), raw

    def get(self, token_id: int) -> tuple[str, bytes]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return list(self.get(token_id)[1])


def chat_logprobs(entries: Iterable[common_pb2.TokenLogprob], strings: TokenStrings) -> dict[str, Any]:
    """OpenAI chat `logprobs` (`ChoiceLogprobs`) for some tokens."""
    content = []
    for entry in entries:
        text, raw = strings.get(entry.token_id)
        content.append({
            "token": text,
            "logprob": clamp(entry.logprob),
            "bytes": list(raw),
            "top_logprobs": [
                {"token": strings.text(top.token_id), "logprob": clamp(top.logprob),
                 "bytes": strings.bytes(top.token_id)}
                for top in entry.top_logprobs
            ],
        })
    return {"content": content}


class CompletionLogprobs:
    """Completions `logprobs` for one choice; keeps the running `text_offset` across chunks.

    With `echo` the prompt's tokens come first (`add_prompt`): the tokens without a logprob
    (the first one, which nothing predicts) have `null` logprob and top_logprobs, as OpenAI's."""

    def __init__(self, strings: TokenStrings) -> None:
        self._strings = strings
        self.offset = 0

    def add(self, entries: Iterable[common_pb2.TokenLogprob]) -> dict[str, Any]:
        return self._build([(entry.token_id, entry) for entry in entries])

    def add_prompt(self, token_ids: list[int], entries: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        """The prompt's tokens; `entries` are the logprobs of its last len(entries) tokens."""
        first = len(token_ids) - len(entries)
        return self._build([(t, entries[i - first] if i >= first else None) for i, t in enumerate(token_ids)])

    def _build(self, rows: list[tuple[int, Optional[common_pb2.TokenLogprob]]]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in rows:
            text = self._strings.text(token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(clamp(entry.logprob))
            top = {text: clamp(entry.logprob)}
            for alt in entry.top_logprobs:
                top.setdefault(self._strings.text(alt.token_id), clamp(alt.logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": offsets}


def join_completion_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive pieces of one choice's completions `logprobs` as one."""
    return {key: first[key] + second[key] for key in first}

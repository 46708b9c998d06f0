"""Streaming token ids -> text for one completion: `IncrementalDetokenizer`.

Owns the prefix_offset / read_offset technique of vLLM: each step decodes only a short window
of recent ids, twice (the part already emitted, then with the new ids) and emits the
difference. Text is held back while the window's text ends with U+FFFD, the mark of a
multi-byte UTF-8 character whose remaining bytes are still to come in later byte-level
tokens, so a character is never emitted half. The window also keeps decoders that depend on
context (SentencePiece's leading-space rule) right.

Flushing rule: when the completion ends, call `finish()`; it returns whatever is still held
back (possibly ending in U+FFFD if the model stopped mid-character). After `finish()`, the
concatenation of all deltas (== `text`) equals
`tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
for byte-level BPE tokenizers and whenever no prompt context is given. With prompt context a
SentencePiece tokenizer keeps the first token's leading space (" world" rather than "world"),
which is what a streamed continuation of the prompt should show.
"""
from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5
"""How many trailing prompt ids seed the window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)."""


class IncrementalDetokenizer:
    """Turns the ids of one completion, fed one at a time, into text deltas.

    `tokenizer` is any Hugging Face tokenizer (anything with `decode(ids, skip_special_tokens=,
    clean_up_tokenization_spaces=)`). Not thread-safe; one instance per completion.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        """Prompt context followed by every output id."""
        self._num_context = len(context)
        self._prefix_offset = 0
        """Start of the decode window."""
        self._read_offset = len(context)
        """End of the ids whose text has been emitted."""
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._pieces: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def output_token_ids(self) -> list[int]:
        """The output ids fed so far (prompt context excluded)."""
        return self._ids[self._num_context :]

    @property
    def finished(self) -> bool:
        """True once `finish()` has been called."""
        return self._finished

    def add(self, token_id: int) -> str:
        """Feed one output id; returns the text it completes ("" while a character is partial)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add() after finish()")
        self._ids.append(int(token_id))
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._pieces.append(delta)
        return delta

    def finish(self) -> str:
        """End of the completion: return the held-back text, if any. Idempotent."""
        if self._finished:
            return ""
        self._finished = True
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(
            self._ids[start:end],
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

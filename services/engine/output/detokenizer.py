"""Streaming token ids -> text for one completion: `IncrementalDetokenizer`.

Owns the prefix_offset / read_offset technique of vLLM: each step decodes only a short window
of recent ids, twice (the part already emitted, then with the new ids) and emits the
difference. Text is held back while the window's text ends with U+FFFD, the mark of a
multi-byte UTF-8 character whose remaining bytes are still to come in later byte-level
tokens, so a character is never emitted half. The window also keeps decoders that depend on
context (SentencePiece's leading-space rule) right.

Three paths run that one algorithm; each request uses one (`path`), chosen from the tokenizer:
- "stream": a fast (Rust-backed) Hugging Face tokenizer whose `decode` is the stock one
  (`tokenizer.decode(ids, skip_special_tokens=s, clean_up_tokenization_spaces=False)` is then
  exactly `backend_tokenizer.decode(ids, skip_special_tokens=s)`). Each id costs one call
  into `tokenizers.decoders.DecodeStream.step`, which runs the same window algorithm in Rust
  (the same two decodes, the same U+FFFD hold-back), seeded with the same prompt context.
- "direct": the same tokenizers when a DecodeStream cannot start from our state: a prompt
  context whose text is empty or ends with U+FFFD (DecodeStream would treat it as not yet
  emitted), or a `tokenizers` too old to seed a stream with ids; or when the decoder is not
  one known to only append text as ids come (DecodeStream compares byte lengths where we
  compare character lengths; the two agree when the new text extends the old). The window algorithm in
  Python over the Rust `Tokenizer.decode`, without transformers' wrapper around it.
  A stream that reports an invalid prefix (the window's text stopped extending its earlier
  text, which vLLM saw with a few tokenizers) also turns into "direct" on that id, which
  emits what the Python algorithm does rather than raise.
- "slow": anything else (slow Python tokenizers, subclasses that override `decode`): the
  window algorithm over `tokenizer.decode`.
All three give the same deltas (tests/unit/engine/output/test_detokenizer_paths.py).

Flushing rule: when the completion ends, call `finish()`; it returns whatever is still held
back (possibly ending in U+FFFD if the model stopped mid-character). After `finish()`, the
concatenation of all deltas (== `text`) equals
`tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
for byte-level BPE tokenizers and whenever no prompt context is given. With prompt context a
SentencePiece tokenizer keeps the first token's leading space (" world" rather than "world"),
which is what a streamed continuation of the prompt should show.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5
"""How many trailing prompt ids seed the window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)."""

PATH_STREAM = "stream"
PATH_DIRECT = "direct"
PATH_SLOW = "slow"
PATHS = (PATH_STREAM, PATH_DIRECT, PATH_SLOW)

_STOCK_DECODE_MODULE = "transformers.tokenization_utils_base"
_STOCK_FAST_DECODE_MODULES = frozenset({
    "transformers.tokenization_utils_tokenizers",  # transformers 5: TokenizersBackend
    "transformers.tokenization_utils_fast",  # transformers 4: PreTrainedTokenizerFast
})
_GROWING_DECODERS = frozenset({"ByteLevel", "Metaspace", "WordPiece", "ByteFallback", "Fuse", "Strip", "BPEDecoder",
                               "CTC"})
"""Decoders whose text for ids + [id] starts with their text for ids (given no trailing U+FFFD)."""
_INVALID_PREFIX = "Invalid prefix"
"""The start of the error DecodeStream.step raises when the window's text stops extending its prefix."""


def rust_backend(tokenizer: Any) -> Optional[tokenizers.Tokenizer]:
    """The `tokenizers.Tokenizer` whose `decode(ids, skip_special_tokens=s)` is exactly
    `tokenizer.decode(ids, skip_special_tokens=s, clean_up_tokenization_spaces=False)`, or None
    (a slow tokenizer, or a class that overrides `decode` / `_decode`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        return None
    mro = type(tokenizer).__mro__
    decode_owner = next((k for k in mro if "decode" in vars(k)), None)
    inner_owner = next((k for k in mro if "_decode" in vars(k)), None)
    if decode_owner is None or decode_owner.__module__ != _STOCK_DECODE_MODULE:
        return None
    if inner_owner is None or inner_owner.__module__ not in _STOCK_FAST_DECODE_MODULES:
        return None
    return backend


def _text_only_grows(decoder: Any) -> bool:
    """Whether `decoder` (a `tokenizers` decoder, or None) only appends to the text of a window as
    ids are added, so DecodeStream's byte-length test agrees with our character-length one (a
    multi-character Replace after Fuse, say, can shrink the text: "a" + "b" -> "X")."""
    if decoder is None:
        return True
    return _state_only_grows(json.loads(decoder.__getstate__()))


def _state_only_grows(state: dict) -> bool:
    kind = state.get("type")
    if kind == "Sequence":
        return all(_state_only_grows(part) for part in state.get("decoders", ()))
    if kind == "Replace":
        pattern = state.get("pattern", {})
        return isinstance(pattern.get("String"), str) and len(pattern["String"]) == 1
    return kind in _GROWING_DECODERS


def _seeded_stream(context: list[int], context_text: str, skip_special_tokens: bool) -> Optional[DecodeStream]:
    """A DecodeStream in the state of the window algorithm after the prompt context (window =
    context, all of it read), or None where a stream cannot be put in that state."""
    if not context:
        return DecodeStream(skip_special_tokens=skip_special_tokens)
    # a seeded stream decodes its ids at the first step and counts them as read only if their
    # text is non-empty and complete; otherwise it would emit the context's text as output
    if not context_text or context_text.endswith(REPLACEMENT_CHAR):
        return None
    try:
        return DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
    except TypeError:  # tokenizers < 0.22: no `ids`
        return None


class IncrementalDetokenizer:
    """Turns the ids of one completion, fed one at a time, into text deltas.

    `tokenizer` is any Hugging Face tokenizer (anything with `decode(ids, skip_special_tokens=,
    clean_up_tokenization_spaces=)`). `path` forces one of PATHS (tests and benches; "stream"
    and "direct" need a stock fast tokenizer); None picks the fastest that applies. Not
    thread-safe; one instance per completion.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
        path: Optional[str] = None,
    ) -> None:
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown detokenizer path {path!r}; expected one of {PATHS}")
        backend = rust_backend(tokenizer) if path != PATH_SLOW else None
        if path in (PATH_STREAM, PATH_DIRECT) and backend is None:
            raise ValueError(f"the {path!r} detokenizer path needs a fast tokenizer with the stock decode")
        self._backend = backend
        self._decoder: Callable[..., str]
        if backend is not None:
            self._decoder = backend.decode
            self._decode_kwargs: dict[str, Any] = {"skip_special_tokens": skip_special_tokens}
        else:
            self._decoder = tokenizer.decode
            self._decode_kwargs = {"skip_special_tokens": skip_special_tokens,
                                   "clean_up_tokenization_spaces": False}
        context = [int(t) for t in list(prompt_token_ids)[-PROMPT_CONTEXT_TOKENS:]]
        self._ids: list[int] = context
        """Prompt context followed by every output id."""
        self._num_context = len(context)
        self._prefix_offset = 0
        """Start of the decode window."""
        self._read_offset = len(context)
        """End of the ids whose text has been emitted."""
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        """The window's emitted text; on the stream path only kept up to date on leaving it."""
        self._stream: Optional[DecodeStream] = None
        if backend is not None and (path == PATH_STREAM or (path is None and _text_only_grows(backend.decoder))):
            self._stream = _seeded_stream(context, self._prefix_text, skip_special_tokens)
        self._path = PATH_SLOW if backend is None else PATH_STREAM if self._stream is not None else PATH_DIRECT
        self._pieces: list[str] = []
        self._finished = False

    @property
    def path(self) -> str:
        """Which of PATHS this completion runs on now ("stream" can turn into "direct")."""
        return self._path

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
        token_id = int(token_id)
        self._ids.append(token_id)
        stream = self._stream
        if stream is None:
            return self._window_step()
        try:
            delta = stream.step(self._backend, token_id)
        except Exception as error:  # tokenizers raises a plain Exception
            if not str(error).startswith(_INVALID_PREFIX):
                raise
            self._leave_stream()
            return self._window_step()
        if delta is None:
            return ""
        # the stream moved its window exactly as `_window_step` does
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(delta)
        return delta

    def finish(self) -> str:
        """End of the completion: return the held-back text, if any. Idempotent."""
        if self._finished:
            return ""
        self._finished = True
        if self._stream is not None:
            self._stream = None
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        if delta:
            self._pieces.append(delta)
        return delta

    def _window_step(self) -> str:
        """The window algorithm for the id just appended to `_ids`."""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._pieces.append(delta)
        return delta

    def _leave_stream(self) -> None:
        """Go on with the window algorithm in Python from the stream's window."""
        self._stream = None
        self._path = PATH_DIRECT
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._decoder(self._ids[start:end], **self._decode_kwargs)

"""Structured output as token masks: compiles `StructuredOutputParams` with xgrammar.

Owns: compiling a spec (JSON schema, JSON object, regex, EBNF) into an xgrammar
`CompiledGrammar` for one tokenizer and logits width (an LRU cache keyed by `spec.key`),
one request's matcher (`GrammarState`), and the packed bitmask that masks logits.

Bitmask layout (xgrammar's): int32 tensor of shape [batch, ceil(vocab_size / 32)]; bit j of
word w is token 32 * w + j, 1 = allowed. A row of all ones (-1) constrains nothing, so
unconstrained requests in a batch keep such a row and `apply_bitmask` leaves them untouched.
Matchers fill CPU tensors only; `apply_bitmask` moves the mask to the logits' device.

EOS: xgrammar's `TokenizerInfo` holds the stop token ids. `from_huggingface` would default
them to `tokenizer.eos_token_id` alone (and without a tokenizer eos it guesses from the
vocabulary), so we pass the model's eos ids explicitly (`stop_token_ids`, e.g. from
generation_config). A matcher allows a stop token only once the grammar is complete (it is
then the only thing allowed when the grammar cannot continue); accepting it terminates the
matcher. Other special tokens (e.g. `<|im_start|>`) are blanked from the vocabulary we hand
xgrammar, which makes them "special" there and never allowed; otherwise xgrammar reads them
as their literal text and would allow them inside JSON strings.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Optional, Sequence, Union

import torch
import xgrammar as xgr

from baton.services.engine.sampling_params import StructuredOutputParams

_KIND_NAMES = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "grammar": "EBNF grammar"}
_LOG_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: \(.*?\) is false:\s*")
_JSON_OBJECT_SCHEMA = '{"type": "object"}'


class StructuredOutputError(ValueError):
    """A structured-output spec that cannot be compiled (bad JSON schema, regex or EBNF)."""


def _xgrammar_reason(error: BaseException) -> str:
    """xgrammar's error text without its C++ log prefix ("[12:00:00] file.cc:42: ...")."""
    text = str(error).strip()
    text = _LOG_PREFIX.sub("", text)
    return _CHECK_PREFIX.sub("", text).strip() or type(error).__name__


def _as_id_list(ids: Union[int, Sequence[int], None]) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (control tokens such as `<|im_start|>`)."""
    special = set(_as_id_list(getattr(tokenizer, "all_special_ids", None)))
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    return special


def build_tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of a Hugging Face tokenizer for a model with `vocab_size` logits.

    Vocab type and prefix-space handling are detected by `TokenizerInfo.from_huggingface`;
    the vocabulary is then rebuilt with special tokens blanked (see the module docstring).
    Ids past the tokenizer's vocabulary (padded logits) are blank too, hence never allowed."""
    stops = list(stop_token_ids)
    if not stops:
        raise ValueError("stop_token_ids must name at least one token (the model's eos)")
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
    special = _special_token_ids(tokenizer)
    if not special:
        return detected
    encoded_vocab = [""] * vocab_size
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size and token_id not in special:
            encoded_vocab[token_id] = token
    return xgr.TokenizerInfo(
        encoded_vocab,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=stops,
        add_prefix_space=detected.add_prefix_space,
    )


class GrammarState:
    """One request's matcher: masks the next token, then follows the sampled ones."""

    def __init__(self, matcher: xgr.GrammarMatcher, stop_token_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._stop_token_ids = list(stop_token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a CPU int32 bitmask). Once
        terminated only the stop tokens are allowed, so a finished row stays well defined."""
        if self._matcher.is_terminated():
            bitmask[row].zero_()
            for token_id in self._stop_token_ids:
                word, bit = divmod(token_id, 32)
                if word < bitmask.shape[1]:
                    # int32 view of the word with the bit set (bit 31 is the sign bit)
                    value = int(bitmask[row, word]) & 0xFFFFFFFF | (1 << bit)
                    bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False (state unchanged) if the grammar forbids it."""
        return bool(self._matcher.accept_token(int(token_id)))

    def is_terminated(self) -> bool:
        """True once a stop token was accepted after a complete match."""
        return bool(self._matcher.is_terminated())

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (e.g. rejected speculative tokens)."""
        if num_tokens < 0:
            raise ValueError(f"rollback: num_tokens must be non-negative, got {num_tokens}")
        if num_tokens == 0:
            return
        try:
            self._matcher.rollback(num_tokens)
        except RuntimeError as error:
            raise ValueError(f"rollback of {num_tokens} tokens failed: {_xgrammar_reason(error)}") from error


class GrammarCompilerCache:
    """Compiles structured-output specs for one tokenizer and logits width, LRU-cached.

    `vocab_size` is the model's logits width (may exceed `len(tokenizer)`).
    `stop_token_ids` are the model's eos ids (default: the tokenizer's eos token).
    `json_max_whitespace` bounds the whitespace characters between JSON tokens, which keeps
    weak models from looping on whitespace while still allowing pretty-printed output
    (None: unbounded). Thread-safe; compiling happens outside the lock."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        max_entries: int = 256,
        *,
        stop_token_ids: Optional[Sequence[int]] = None,
        json_max_whitespace: Optional[int] = 16,
        max_threads: int = 8,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        stops = _as_id_list(stop_token_ids) or _as_id_list(getattr(tokenizer, "eos_token_id", None))
        if not stops:
            raise ValueError("the tokenizer has no eos token: pass stop_token_ids (the model's eos ids)")
        self.vocab_size = vocab_size
        self.max_entries = max_entries
        self.stop_token_ids: tuple[int, ...] = tuple(stops)
        self.json_max_whitespace = json_max_whitespace
        self.tokenizer_info = build_tokenizer_info(tokenizer, vocab_size, stops)
        # xgrammar's own cache is unbounded; ours is the LRU bound, so turn xgrammar's off.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._entries: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def compile(self, spec: StructuredOutputParams) -> xgr.CompiledGrammar:
        """The compiled grammar for `spec` (cached); StructuredOutputError if it is invalid."""
        key = spec.key
        with self._lock:
            compiled = self._entries.get(key)
            if compiled is not None:
                self._entries.move_to_end(key)
                return compiled
        compiled = self._compile_uncached(spec)
        with self._lock:
            existing = self._entries.get(key)  # another thread may have compiled it meanwhile
            if existing is not None:
                self._entries.move_to_end(key)
                return existing
            self._entries[key] = compiled
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return compiled

    def new_state(self, spec: StructuredOutputParams) -> GrammarState:
        """A fresh matcher for one request constrained by `spec`."""
        return GrammarState(xgr.GrammarMatcher(self.compile(spec)), self.stop_token_ids)

    def _compile_uncached(self, spec: StructuredOutputParams) -> xgr.CompiledGrammar:
        kind = spec.key[0]
        try:
            if spec.json is not None:
                _check_schema_text(spec.json)
                return self._compile_json_schema(spec.json)
            if spec.json_object:
                return self._compile_json_schema(_JSON_OBJECT_SCHEMA)
            if spec.regex is not None:
                return self._compiler.compile_regex(spec.regex)
            return self._compiler.compile_grammar(spec.grammar or "")
        except StructuredOutputError:
            raise
        except Exception as error:  # xgrammar reports bad input as RuntimeError (from C++)
            raise StructuredOutputError(f"invalid {_KIND_NAMES[kind]}: {_xgrammar_reason(error)}") from error

    def _compile_json_schema(self, schema: str) -> xgr.CompiledGrammar:
        return self._compiler.compile_json_schema(
            schema, any_whitespace=True, max_whitespace_cnt=self.json_max_whitespace, strict_mode=True
        )


def _check_schema_text(schema: str) -> None:
    """Refuse schema text that is not JSON, or not an object / boolean, with a clear reason."""
    try:
        parsed = json.loads(schema)
    except (json.JSONDecodeError, RecursionError) as error:
        raise StructuredOutputError(f"invalid JSON schema: the schema is not valid JSON ({error})") from error
    if not isinstance(parsed, (dict, bool)):
        raise StructuredOutputError(
            f"invalid JSON schema: a schema must be a JSON object or boolean, got {type(parsed).__name__}"
        )


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """An all-ones (nothing masked) CPU int32 bitmask of shape [batch, ceil(vocab_size / 32)]."""
    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits of disallowed tokens to -inf, in place. `logits` is [B, V] (float32, bf16 or
    fp16; CPU, or CUDA through xgrammar's Triton kernel), `bitmask` [B, ceil(V / 32)] int32
    (copied to the logits' device if needed). All-ones rows (unconstrained) stay untouched."""
    if logits.dim() != 2 or bitmask.dim() != 2 or logits.shape[0] != bitmask.shape[0]:
        raise ValueError(
            f"apply_bitmask: logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} "
            "must be [B, V] and [B, ceil(V / 32)]"
        )
    if bitmask.dtype != torch.int32:
        raise ValueError(f"apply_bitmask: bitmask must be int32, got {bitmask.dtype}")
    vocab_size = logits.shape[1]
    if bitmask.shape[1] * 32 < vocab_size:
        raise ValueError(
            f"apply_bitmask: a bitmask of {bitmask.shape[1]} words covers fewer than the {vocab_size} logits"
        )
    if bitmask.device != logits.device:
        # a blocking copy: the caller may refill this CPU bitmask right after we return
        bitmask = bitmask.to(logits.device)
    if logits.device.type == "cpu":
        constrained = (bitmask != -1).any(dim=1).nonzero().flatten().tolist()
        if not constrained:
            return
        indices = None if len(constrained) == logits.shape[0] else constrained
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=indices)
        return
    # on an accelerator, all-ones rows are no-ops; finding them would cost a device sync
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size)

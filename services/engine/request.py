"""One sequence inside the engine, and the outputs the engine hands back.

A `Request` is one completion (a prompt with n > 1 becomes n requests sharing a parent
id). Its life: WAITING (queued, no blocks) -> RUNNING (holds blocks; prefilling in chunks,
then decoding one token per step) -> FINISHED. Preemption sends a RUNNING request back to
WAITING with its blocks released and its generated tokens kept; it is recomputed later.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from baton.services.engine.sampling_params import SamplingParams


PENDING_TOKEN = -1
"""Placeholder in `output_token_ids` for a token sampled on the GPU whose value the host has not read yet."""


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A single completion being generated."""

    request_id: str
    parent_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    cache_node: Any = None
    generator: Optional[torch.Generator] = None
    grammar: Any = None
    detokenizer: Any = None
    stop_checker: Any = None
    text_parts: list[str] = field(default_factory=list, repr=False)
    """The output text so far, delta by delta (`text` joins them: appending to one string copied it
    whole on every token, 7 us a token at 32k tokens)."""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    """Logprob entries of the prompt tokens from `prompt_logprobs.first_position` on, as computed so far."""
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    num_preemptions: int = 0
    first_admission: bool = True
    sync_only: bool = False
    """Never in an overlapped step (host state: grammar, penalties, logprobs, a held prefill lease)."""
    pending_row: int = -1
    """Row of this request in the last overlapped step's sampled tokens (still on the GPU): its last
    output token is the placeholder PENDING_TOKEN until the engine reads that step's tokens back."""
    multimodal: Any = None
    """The request's images (`multimodal.inputs.MultimodalState`): spans, prefix-cache key; None for text."""
    prompt_array: Any = field(default=None, repr=False)
    """`prompt_token_ids` as an int64 numpy array, built by the model runner on first use (`runner/positions.py`)."""

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the tokens generated so far."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def cache_token_ids(self) -> list[int]:
        """The prefix-cache key of `all_token_ids`: image placeholders stand as their image's pseudo id."""
        if self.multimodal is None:
            return self.all_token_ids
        return self.multimodal.cache_key + self.output_token_ids

    @property
    def text(self) -> str:
        """The output text so far."""
        return "".join(self.text_parts)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not in the cache yet (the next step's input)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """True once a finish reason is set."""
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestDelta:
    """What one step produced for one request (the unit a streaming service forwards)."""

    request_id: str
    parent_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    new_logprobs: list[dict[str, Any]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: Optional[str] = None
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    """On the delta of the first output token, when the request asked for prompt logprobs: one entry
    ({token_id, logprob, top_logprobs}) per prompt position from max(prompt_logprobs_start, 1) on."""


@dataclass
class CompletionOutput:
    """One completion of a finished (or in-progress) prompt."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: Optional[str]
    stop_reason: Any = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """Everything generated for one prompt (n completions)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = False
    error: Optional[str] = None
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    """Entries for prompt positions from max(prompt_logprobs_start, 1) on (when asked for)."""

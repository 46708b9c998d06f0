"""Per-request generation settings: `SamplingParams` and its structured-output spec.

Owns validation: every bad value raises `ValueError` with a message naming the field, at
construction, so a bad request is refused before it touches the engine. The names and
meanings follow vLLM / the OpenAI API so users of either feel at home.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

_GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample as argmax: dividing logits by a near-zero temperature
overflows float32 to inf and the softmax to NaN (vLLM uses the same threshold)."""


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one constraint on the generated text, enforced as a token mask."""

    json: Optional[str] = None
    """A JSON schema (as a JSON string) the output must validate against."""
    json_object: bool = False
    """Any JSON object (OpenAI's `response_format: json_object`)."""
    regex: Optional[str] = None
    """A regular expression the whole output must match."""
    grammar: Optional[str] = None
    """An EBNF grammar (GBNF dialect, `root ::= ...`) the output must derive from."""

    def __post_init__(self) -> None:
        given = [self.json is not None, self.json_object, self.regex is not None, self.grammar is not None]
        if sum(given) != 1:
            raise ValueError("structured_output: give exactly one of json, json_object, regex, grammar")

    @property
    def key(self) -> tuple[str, str]:
        """A hashable key naming the constraint (used to cache compiled grammars)."""
        if self.json is not None:
            return ("json", self.json)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        return ("grammar", self.grammar or "")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completion(s)."""

    n: int = 1
    """Number of completions to return for the prompt."""
    max_tokens: Optional[int] = 16
    """Most tokens to generate per completion; None means up to the model's context length."""
    min_tokens: int = 0
    """Fewest tokens to generate before EOS or stop token ids may end a completion."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to at least top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens seen in prompt or output; 1 is off."""
    frequency_penalty: float = 0.0
    """Subtract this times the token's count in the output so far from its logit."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token already present in the output."""
    seed: Optional[int] = None
    """Seed of this request's own random generator, for reproducible sampling."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; the text is cut before the stop string."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the completion (in addition to EOS unless ignore_eos)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (for benchmarks with fixed output lengths)."""
    logprobs: Optional[int] = None
    """Return the sampled token's log-probability plus this many top alternatives (0: just the sampled one)."""
    prompt_logprobs: Optional[int] = None
    """Return the log-probability of each prompt token (from `prompt_logprobs_start` on) plus this many top
    alternatives (0: just the prompt token's own); vLLM's name. The first prompt token never has one."""
    prompt_logprobs_start: int = 0
    """First prompt position whose log-probability is returned (SGLang's `logprob_start_len`); only the prompt
    before it may come from the prefix cache, since every position after needs its logits computed."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    structured_output: Optional[StructuredOutputParams] = None
    """A constraint (JSON schema, JSON object, regex, EBNF) the output must satisfy."""
    priority: int = 0
    """Scheduling priority under `--schedule-policy priority`; lower values run first."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form annotations carried with the request (not used by sampling)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must not exceed max_tokens"),
            (self.temperature >= 0.0, "temperature must be non-negative"),
            (self.top_k == -1 or self.top_k >= 0, "top_k must be -1 (off) or non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be positive"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]"),
            (self.prompt_logprobs_start >= 0, "prompt_logprobs_start must be non-negative"),
            (self.prompt_logprobs is not None or self.prompt_logprobs_start == 0,
             "prompt_logprobs_start needs prompt_logprobs"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1

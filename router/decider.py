"""Whether to disaggregate a request: prefill + decode, or decode-only.

After llm-d's disaggregation decider (``profilehandler/disagg``): a prefill worker pays
off only when there is enough prompt left to compute. A short uncached remainder is
cheaper to prefill on the decode worker itself than to ship as KV blocks, and it skips a
hop (and its failure modes).

Rule: disaggregate (``decide`` returns True) only when all hold:
- a prefill worker is available (``have_prefill``);
- the request asks for one completion (``n <= 1``): requests with ``n > 1`` always go
  decode-only, their n samples prefilled and served together on one decode worker (the
  router passes ``n`` from the request separately from the prompt);
- the request does not ask for prompt logprobs (``prompt_logprobs``): they need the logits of
  every prompt position, and a prefill worker hands over KV blocks and one token, not logits,
  so such a request is prefilled (and scored) on its decode worker;
- the uncached part of the prompt, ``len(prompt) - cached_tokens_estimate`` (the estimate
  clamped to [0, len(prompt)]), is strictly greater than ``decode_only_threshold``.

- the prefill workers are not backed up (conditional disaggregation, as Dynamo's disagg router
  does): when even the least-loaded prefill worker already holds more than
  ``prefill_backlog_limit`` prompt tokens, waiting or running (its load report), the decode
  worker prefills the request itself, mixing it into its decode steps, instead of queueing it
  behind the others. On one GPU shared by a prefill and a decode worker this keeps 1P1D close
  to colocated when prefill is the bottleneck; on separate GPUs it trades some decode ITL for
  TTFT when the prefill tier is short of capacity.

``cached_tokens_estimate`` is the router's guess of how much of the prompt the decode
worker already holds (for instance the matched prefix in a cache-aware policy's tree for
that worker); 0 when unknown.

Parameters:
- ``decode_only_threshold`` (int >= 0, default 256): the largest uncached remainder, in
  tokens, still prefilled on the decode worker. 0 disaggregates every request with at
  least one uncached token.
- ``prefill_backlog_limit`` (int >= 0, default 16384): prompt tokens a prefill worker may hold
  (queued + running) before requests are prefilled on their decode worker instead; 0: never.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DisaggDecider:
    """Decode-only below a threshold of uncached prompt tokens, else prefill + decode."""

    decode_only_threshold: int = 256
    """Largest uncached prompt remainder (tokens) that decode prefills by itself."""

    prefill_backlog_limit: int = 16384
    """Prompt tokens the least-loaded prefill worker may hold before decode prefills by itself (0: never)."""

    def __post_init__(self) -> None:
        if self.decode_only_threshold < 0:
            raise ValueError(f"decode_only_threshold must be >= 0, got {self.decode_only_threshold}")
        if self.prefill_backlog_limit < 0:
            raise ValueError(f"prefill_backlog_limit must be >= 0, got {self.prefill_backlog_limit}")

    def backed_up(self, prefill_backlog_tokens: int) -> bool:
        """True when the least-loaded prefill worker's backlog is past the limit."""
        return self.prefill_backlog_limit > 0 and prefill_backlog_tokens > self.prefill_backlog_limit

    @staticmethod
    def uncached_tokens(prompt_token_ids: Sequence[int], cached_tokens_estimate: int) -> int:
        """Prompt tokens left to compute, with the estimate clamped to [0, len(prompt)]."""
        n = len(prompt_token_ids)
        return n - min(max(cached_tokens_estimate, 0), n)

    def decide(self, prompt_token_ids: Sequence[int], cached_tokens_estimate: int,
               have_prefill: bool, n: int = 1, prompt_logprobs: bool = False,
               prefill_backlog_tokens: int = 0) -> bool:
        """True to disaggregate (prefill + decode), False for decode-only."""
        if not have_prefill or n > 1 or prompt_logprobs or self.backed_up(prefill_backlog_tokens):
            return False
        return self.uncached_tokens(prompt_token_ids, cached_tokens_estimate) > self.decode_only_threshold

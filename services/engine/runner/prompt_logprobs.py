"""Prompt logprobs: which positions of a step need their logits, and the entries computed from them.

A request with `params.prompt_logprobs` set gets the log-probability of every prompt token
from `first_position(request)` = max(prompt_logprobs_start, 1) on: the logprob of prompt
token t comes from the logits at position t - 1, so the positions whose logits are needed
are [first_position - 1, len(prompt) - 1) (the last prompt position's logits sample the
first output token, as for any request).

Those positions must be computed, never taken from the prefix cache: `cache_limit` is how
many leading prompt tokens the prefix match may cover (vLLM skips prefix reuse for prompt
logprobs altogether; with a start the shared part before it still comes from the cache).
Once a request has every entry (after a preemption, say) the limit is lifted and nothing
is computed twice: `positions` skips what `request.prompt_logprobs` already holds.

Entries have the shape of sampled-token logprobs (`{token_id, logprob, top_logprobs}`),
taken from the raw logits (no temperature or penalties), like the sampler's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from baton.services.engine.request import Request
from baton.services.engine.sampling.sampler import gather_logprobs

if TYPE_CHECKING:  # the scheduler imports this module (cache_limit)
    from baton.services.engine.scheduling.scheduler import ScheduledItem

ROWS_PER_SLICE = 256
"""Logit rows computed at once (a [rows, vocab] float32 tensor each): bounds the memory of long prompts."""


def wants(request: Request) -> bool:
    """True while the request asks for prompt logprobs and some are still missing."""
    return request.params.prompt_logprobs is not None and len(request.prompt_logprobs) < _count(request)


def first_position(request: Request) -> int:
    """The first prompt position whose token gets a logprob."""
    return max(request.params.prompt_logprobs_start, 1)


def _count(request: Request) -> int:
    return max(0, len(request.prompt_token_ids) - first_position(request))


def cache_limit(request: Request) -> Optional[int]:
    """Leading prompt tokens the prefix cache may supply (None: no limit)."""
    if not wants(request):
        return None
    return first_position(request) - 1 + len(request.prompt_logprobs)


def positions(request: Request, start: int, num_tokens: int) -> range:
    """The positions in [start, start + num_tokens) whose logits give a missing prompt logprob."""
    if not wants(request):
        return range(0)
    low = max(start, first_position(request) - 1 + len(request.prompt_logprobs))
    high = min(start + num_tokens, len(request.prompt_token_ids) - 1)
    return range(low, max(low, high))


def compute(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: Sequence[int], tops: Sequence[int]) -> list[dict[str, Any]]:
    """One entry per row of `hidden` [rows, H]: the logprob of `targets[i]` under `logits_fn(hidden[i])`
    and the `tops[i]` most likely alternatives, in slices of ROWS_PER_SLICE rows."""
    entries: list[dict[str, Any]] = []
    for low in range(0, hidden.shape[0], ROWS_PER_SLICE):
        high = min(low + ROWS_PER_SLICE, hidden.shape[0])
        logprobs = torch.log_softmax(logits_fn(hidden[low:high]).float(), dim=-1)
        target = torch.tensor(targets[low:high], dtype=torch.long, device=logprobs.device)
        for token, (logprob, top) in zip(targets[low:high], gather_logprobs(logprobs, target, tops[low:high])):
            entries.append({"token_id": int(token), "logprob": logprob, "top_logprobs": top})
    return entries


@dataclass
class PromptRows:
    """The rows of one step whose logits give prompt logprobs, planned while the step is flattened."""

    rows: list[int] = field(default_factory=list)
    """Index (into the step's flattened tokens) of each such position."""
    targets: list[int] = field(default_factory=list)
    """The prompt token each row predicts (the one whose logprob is returned)."""
    tops: list[int] = field(default_factory=list)
    """How many top alternatives each row returns."""
    items: list[tuple["ScheduledItem", int]] = field(default_factory=list)
    """(item, its number of rows), in row order."""

    def add(self, item: "ScheduledItem", first_row: int) -> None:
        """Plan the rows of `item`, whose tokens start at `first_row` of the flattened step."""
        request = item.request
        wanted = positions(request, item.start, item.num_tokens)
        if not wanted:
            return
        self.rows.extend(first_row + p - item.start for p in wanted)
        self.targets.extend(request.prompt_token_ids[wanted.start + 1:wanted.stop + 1])
        self.tops.extend([request.params.prompt_logprobs] * len(wanted))
        self.items.append((item, len(wanted)))

    def compute(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> None:
        """Compute the entries from the step's hidden states and hand each item its share."""
        index = torch.tensor(self.rows, dtype=torch.long).to(hidden.device)
        entries = compute(logits_fn, hidden.index_select(0, index), self.targets, self.tops)
        offset = 0
        for item, count in self.items:
            item.prompt_logprobs = entries[offset:offset + count]
            offset += count

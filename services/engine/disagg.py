"""The engine hooks that disaggregated serving needs, on top of `Engine`.

Prefill side: `add_request(..., hold_blocks=True)` keeps a finished request's KV blocks
referenced (a lease) so the transfer engine can read them after the first token is
sampled; `held_blocks` lists them and `release_held` ends the lease.

Decode side, a request's life: `reserve` (validate, then the scheduler's `reserve_external`:
match the local prefix cache, allocate blocks for the whole prompt; the request is in no
queue) -> the prompt's missing KV lands in those blocks from a prefill worker ->
`activate(first_token)` (the scheduler's `admit_running`: the prompt counts as computed and
the request joins the running batch; the first token goes through the normal output path).
`cancel_reservation` gives everything back if the hand-off fails. The scheduler keeps the
reservations, so `stats()` counts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from baton.services.engine.engine import Engine
from baton.services.engine.request import Request, RequestDelta
from baton.services.engine.sampling.sampler import SampledToken
from baton.services.engine.sampling_params import SamplingParams


@dataclass
class Reservation:
    """Decode's blocks for a prompt whose KV comes from elsewhere."""

    block_ids: list[int]
    """The request's whole block table (one block per prompt page)."""
    cached_tokens: int
    """Leading prompt tokens already in this worker's prefix cache (whole pages)."""


class DisaggEngine(Engine):
    """An `Engine` that can lease finished blocks (prefill) and adopt external KV (decode)."""

    def __init__(self, *args, **kwargs) -> None:
        self._hold: set[str] = set()
        self._held: dict[str, list[int]] = {}
        super().__init__(*args, **kwargs)  # last: it may run the warm-up, which retires requests

    # --- prefill side ----------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    hold_blocks: bool = False, resume=None) -> None:
        """Queue a prompt; with hold_blocks its blocks stay leased after it finishes; `resume`:
        see `Engine.add_request`."""
        if hold_blocks and params.n != 1:
            raise ValueError("held (prefill) requests must have n == 1")
        super().add_request(request_id, prompt_token_ids, params, resume=resume)
        if hold_blocks:
            self._hold.add(request_id)
            for request in self._requests[request_id]:
                request.sync_only = True  # its finish must be seen before another step touches its blocks

    def _before_release(self, request: Request) -> None:
        if request.request_id in self._hold:
            self._hold.discard(request.request_id)
            self.pool.share(request.block_table)
            self._held[request.request_id] = list(request.block_table)

    def held_blocks(self, request_id: str) -> list[int]:
        """The leased blocks of a finished held request (KeyError if none)."""
        return self._held[request_id]

    def release_held(self, request_id: str) -> None:
        """End the lease of a held request's blocks (no-op when there is none)."""
        self._hold.discard(request_id)
        blocks = self._held.pop(request_id, None)
        if blocks is not None:
            self.pool.release(blocks)

    # --- decode side -----------------------------------------------------------------
    def reserve(self, request_id: str, prompt_token_ids: Sequence[int],
                params: SamplingParams, images: Sequence = ()) -> Optional[Reservation]:
        """Blocks for a prompt whose KV will be written from outside; None when memory is short.
        `images`: the prompt's `multimodal.inputs.ImageSpan`s (their hashes key the prefix cache;
        with their embeddings the request survives a preemption, which recomputes it here)."""
        if params.n != 1:
            raise ValueError("a disaggregated request must have n == 1")
        state = None
        if images:
            from baton.services.engine.multimodal.inputs import build_state
            state = build_state(self.model_config, [int(t) for t in prompt_token_ids], images)
        [request] = self._new_requests(request_id, prompt_token_ids, params)
        request.multimodal = state
        if not self.scheduler.reserve_external(request):
            self._requests.pop(request_id, None)
            return None
        return Reservation(block_ids=list(request.block_table), cached_tokens=request.num_computed_tokens)

    def activate(self, request_id: str, first_token: int, logprob: Optional[float] = None,
                 top_logprobs: Optional[list[tuple[int, float]]] = None,
                 remote_cached_tokens: int = 0) -> RequestDelta:
        """The prompt's KV is in place: apply prefill's first token and join the running batch.
        `remote_cached_tokens`: prompt tokens the prefill worker found in its own prefix cache;
        the request's cached count is the larger of that and this worker's own match (prefix
        hits count wherever they happen)."""
        request = self.scheduler.reservation(request_id)
        if request is None:
            raise KeyError(request_id)
        request.num_cached_tokens = max(request.num_cached_tokens,
                                        min(remote_cached_tokens, len(request.prompt_token_ids)))
        if request.generator is not None and not request.params.greedy:
            torch.rand(1, generator=request.generator, dtype=torch.float64)  # prefill drew one number
        self.scheduler.admit_running(request)
        delta = self.outputs.on_token(request, SampledToken(first_token, logprob, top_logprobs))
        if request.finish_reason is not None:
            self._retire(request)
        return delta

    def cancel_reservation(self, request_id: str) -> None:
        """Give back a reservation's blocks and forget the request."""
        request = self.scheduler.reservation(request_id)
        if request is None:
            return
        self.scheduler.cancel_reservation(request)
        self._requests.pop(request_id, None)

    def abort(self, request_id: str) -> list[RequestDelta]:
        """Abort a queued, running or reserved request and end any lease it holds."""
        self.release_held(request_id)
        request = self.scheduler.reservation(request_id)
        if request is None:
            return super().abort(request_id)
        self.cancel_reservation(request_id)
        return [RequestDelta(request_id, request_id, 0, [], "", finish_reason="abort",
                             num_prompt_tokens=len(request.prompt_token_ids))]

    def check_idle_integrity(self) -> None:
        assert not self.scheduler.num_reserved and not self._held, "reservations or leases outstanding"
        super().check_idle_integrity()

"""Continuous-batching scheduler: which requests run this step, with how many tokens.

One `schedule()` call per engine step, under a token budget:
1. running requests first, in admission order: a decoding request takes 1 token, a
   prefilling one takes its next chunk (at most `chunked_prefill_size`);
2. then waiting requests, ordered by the policy (fcfs, lpm = longest cached prefix first,
   priority = lowest `priority` value first, ties by arrival), while the batch has room;
   each starts from its longest cached prefix in the radix cache.
When blocks run out, the scheduler first evicts unused cached prefixes (for the running
requests' share of a step in one eviction, not one per request: `_evict_for_running`), then
preempts the most recently admitted running request (recompute: its blocks are released, its
generated tokens kept, and it goes back to the front of the queue).

Decode side of disaggregation (allocator verbs in nano-vllm's style): `reserve_external`
matches the prefix cache and allocates blocks for a whole prompt whose KV is written from
outside; the request is then *reserved* (in no queue, holding its blocks) until
`admit_running` joins it to the running batch or `cancel_reservation` gives everything back.

The queues are private: callers read them through `num_running` / `num_waiting` /
`num_reserved`, the token and block counts, and the snapshots `running_requests()` /
`waiting_requests()`. The counts may be read from another thread (a worker's load report)
while the engine thread schedules: they copy a queue (atomic under the GIL) before walking it.

Prompt logprobs: a request still missing some is matched against the prefix cache only up to
the first position whose logits it needs (`runner/prompt_logprobs.cache_limit`).

Invariants: a RUNNING request holds exactly ceil(num_computed_tokens / page) blocks
between steps (plus the ones allocated for the step it is scheduled in); a WAITING or
FINISHED request holds none, and no radix lock; a reserved request holds the blocks of its
whole prompt (and the radix lock of its cached prefix).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.config import EngineConfig
from baton.services.engine.kv.prefix_cache import PrefixCache
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.runner import prompt_logprobs


@dataclass
class ScheduledItem:
    """One request's share of a step: compute tokens [start, start + num_tokens)."""

    request: Request
    start: int
    num_tokens: int
    prompt_logprobs: Optional[list] = None
    """Prompt logprob entries the model runner computed in this step (requests that asked for them)."""

    @property
    def samples(self) -> bool:
        """True when this step brings the request up to date, so it samples a token."""
        return self.start + self.num_tokens == self.request.num_tokens


class Scheduler:
    """Owns the waiting queue, the running batch, the reservations and block allocation for all."""

    def __init__(self, config: EngineConfig, pool: BlockPool, cache: PrefixCache) -> None:
        config.require_resolved()  # the budgets must be concrete ints (device_defaults.resolve_config)
        self.config = config
        self.pool = pool
        self.cache = cache
        self.page_size = config.page_size
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._reserved: dict[str, Request] = {}
        self.num_preemptions = 0
        """Preemptions since start."""

    # --- queue ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request."""
        self._waiting.append(request)

    def has_work(self) -> bool:
        """True while any request is waiting or running (reservations do not count)."""
        return bool(self._waiting or self._running)

    def remove(self, request: Request) -> None:
        """Take a request out of the queue or batch and give back everything it holds."""
        if request in self._running:
            self._running.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        self.release(request, cache_tokens=True)

    # --- counts and snapshots (the counts are safe to read from another thread) -------
    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue."""
        return len(self._waiting)

    @property
    def num_reserved(self) -> int:
        """Reserved requests (decode side: blocks held, KV not arrived yet)."""
        return len(self._reserved)

    @property
    def running_tokens(self) -> int:
        """Prompt plus generated tokens over the running batch."""
        return sum(r.num_tokens for r in list(self._running))

    @property
    def waiting_tokens(self) -> int:
        """Prompt plus generated tokens over the waiting queue."""
        return sum(r.num_tokens for r in list(self._waiting))

    @property
    def reserved_tokens(self) -> int:
        """Prompt tokens of reserved requests (what their blocks will hold)."""
        return sum(len(r.prompt_token_ids) for r in list(self._reserved.values()))

    @property
    def reserved_blocks(self) -> int:
        """Blocks in the block tables of reserved requests (cached prefix blocks included)."""
        return sum(len(r.block_table) for r in list(self._reserved.values()))

    def running_requests(self) -> tuple[Request, ...]:
        """The running batch, in admission order (a snapshot)."""
        return tuple(self._running)

    def waiting_requests(self) -> tuple[Request, ...]:
        """The waiting queue, front first (a snapshot; admission reorders it per policy)."""
        return tuple(self._waiting)

    def starved_request(self) -> Optional[Request]:
        """The head of the queue when nothing runs (it could not be admitted even alone), else None."""
        if not self._waiting or self._running:
            return None
        return self._waiting[0]

    # --- scheduling ----------------------------------------------------------------
    def schedule(self) -> list[ScheduledItem]:
        """Pick this step's work; never returns a request twice."""
        budget = self.config.max_num_batched_tokens
        items: list[ScheduledItem] = []
        self._evict_for_running(budget)
        for request in list(self._running):
            if request.status is not RequestStatus.RUNNING or budget <= 0:
                continue
            n = min(request.num_uncomputed_tokens, self.config.prefill_chunk, budget)
            if self._grow(request, n, items):
                items.append(ScheduledItem(request, request.num_computed_tokens, n))
                budget -= n
        self._admit(items, budget)
        return items

    def _evict_for_running(self, budget: int) -> None:
        """Evict, in one call, the cached blocks the running requests' share of this step is short
        of (one call per request that allocates used to cost a whole radix-tree walk each; eviction
        now pops a heap of leaves, but one call still does the step's bookkeeping once). The LRU leaves go
        in the same order as with one eviction per request; nothing happens while the pool has room
        for any step."""
        page, free = self.page_size, self.pool.num_free
        if free >= budget // page + 2 * len(self._running):  # no step's running share can need more
            return
        need = 0
        for request in self._running:
            if request.status is not RequestStatus.RUNNING or budget <= 0:
                continue
            n = min(request.num_uncomputed_tokens, self.config.prefill_chunk, budget)
            need += self._blocks_needed(request, n)
            budget -= n
        if need > free:
            self.cache.evict(need - free)

    def _admit(self, items: list[ScheduledItem], budget: int) -> None:
        for request in self._ordered_waiting():
            if len(self._running) >= self.config.max_running_requests:
                return
            if budget <= 0 and not (self.config.chunked_prefill_size == -1 and not items):
                return
            self._match_prefix(request)
            n = min(request.num_uncomputed_tokens, self.config.prefill_chunk)
            whole_prompt_only = self.config.chunked_prefill_size == -1 and items
            if whole_prompt_only and n > budget:
                n = 0
            elif self.config.chunked_prefill_size != -1:
                n = min(n, budget)
            if n <= 0 or not self.can_reserve(request, n):
                self._unmatch(request)
                return
            self._allocate(request, n)
            request.first_admission = False
            self._waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            items.append(ScheduledItem(request, request.num_computed_tokens, n))
            budget -= n

    def _ordered_waiting(self) -> list[Request]:
        policy = self.config.schedule_policy
        queue = list(self._waiting)
        if policy == "priority":
            queue.sort(key=lambda r: (r.params.priority, r.arrival))
        elif policy == "lpm" and self.cache.cached_blocks:  # an empty cache (or the null one) matches nothing
            queue.sort(key=lambda r: -self._peek_prefix_len(r))
        return queue

    def _peek_prefix_len(self, request: Request) -> int:
        return self.cache.match_prefix(_matchable(request), count=False).num_blocks * self.page_size

    # --- blocks --------------------------------------------------------------------
    def _blocks_needed(self, request: Request, n: int) -> int:
        total = -(-(request.num_computed_tokens + n) // self.page_size)
        return max(0, total - len(request.block_table))

    def can_reserve(self, request: Request, num_tokens: int) -> bool:
        """True when blocks for `num_tokens` more tokens of `request` are free, evicting unused
        cached prefixes if that is what it takes; allocates nothing."""
        need = self._blocks_needed(request, num_tokens)
        if self.pool.can_allocate(need):
            return True
        self.cache.evict(need - self.pool.num_free)
        return self.pool.can_allocate(need)

    def _allocate(self, request: Request, n: int) -> None:
        request.block_table.extend(self.pool.allocate(self._blocks_needed(request, n)))

    def _grow(self, request: Request, n: int, items: list[ScheduledItem]) -> bool:
        """Allocate blocks for n more tokens of a running request, preempting others if needed."""
        if self._blocks_needed(request, n) == 0:  # the common decode step: the last block has room
            return True
        while not self.can_reserve(request, n):
            victim = self._pick_victim(request, items)
            if victim is None:
                self.preempt(request)
                return False
            self.preempt(victim)
        self._allocate(request, n)
        return True

    def _pick_victim(self, request: Request, items: list[ScheduledItem]) -> Optional[Request]:
        scheduled = {id(i.request) for i in items}
        candidates = [r for r in self._running if r is not request and id(r) not in scheduled]
        if not candidates:
            return None
        if self.config.schedule_policy == "priority":
            return max(candidates, key=lambda r: (r.params.priority, r.arrival))
        return candidates[-1]

    def preempt(self, request: Request) -> None:
        """Send a running request back to the front of the queue, releasing its blocks."""
        self._running.remove(request)
        self.release(request, cache_tokens=True)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(request)

    # --- external KV (decode side of disaggregation) ---------------------------------
    def reserve_external(self, request: Request) -> bool:
        """Match the prefix cache and allocate blocks for the rest of the prompt, whose KV will
        be written from outside; the request is then reserved (in no queue). False, holding
        nothing, when memory is short."""
        self._match_prefix(request)
        missing = len(request.prompt_token_ids) - request.num_computed_tokens
        if not self.can_reserve(request, missing):
            self.release(request, cache_tokens=False)
            return False
        self._allocate(request, missing)
        request.first_admission = False
        request.status = RequestStatus.WAITING
        self._reserved[request.request_id] = request
        return True

    def reservation(self, request_id: str) -> Optional[Request]:
        """The reserved request with this id, or None."""
        return self._reserved.get(request_id)

    def admit_running(self, request: Request) -> None:
        """A reserved request's prompt KV is in place: count it computed and join the running batch."""
        del self._reserved[request.request_id]
        request.num_computed_tokens = len(request.prompt_token_ids)
        request.status = RequestStatus.RUNNING
        self._running.append(request)

    def cancel_reservation(self, request: Request) -> None:
        """Give back a reserved request's blocks and radix lock (its pages are not cached)."""
        del self._reserved[request.request_id]
        self.release(request, cache_tokens=False)

    # --- prefix cache --------------------------------------------------------------
    def _match_prefix(self, request: Request) -> None:
        if request.block_table:
            return
        match = self.cache.match_prefix(_matchable(request))
        self.cache.lock(match.node)
        self.pool.share(match.blocks)
        request.cache_node = match.node
        request.block_table = list(match.blocks)
        request.num_computed_tokens = len(match.blocks) * self.page_size
        if request.first_admission:
            request.num_cached_tokens = min(request.num_computed_tokens, len(request.prompt_token_ids))

    def _unmatch(self, request: Request) -> None:
        self.release(request, cache_tokens=False)

    def release(self, request: Request, cache_tokens: bool) -> None:
        """Give back a request's blocks (caching its computed whole pages first) and radix lock."""
        if cache_tokens and request.block_table:
            computed = request.cache_token_ids[:request.num_computed_tokens]
            self.cache.insert(computed, request.block_table)
        if request.cache_node is not None:
            self.cache.unlock(request.cache_node)
        self.pool.release(request.block_table)
        request.block_table = []
        request.cache_node = None
        request.num_computed_tokens = 0

    def finish(self, request: Request) -> None:
        """Retire a finished request from the running batch (or from the queue: with overlap
        scheduling a request can be preempted in the step after the one that finished it)."""
        if request in self._running:
            self._running.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        self.release(request, cache_tokens=True)


def _matchable(request: Request) -> list[int]:
    """The tokens the prefix cache may supply: all but the last (its logits sample the next token),
    and none of the positions whose logits give prompt logprobs still missing."""
    tokens = request.cache_token_ids[:-1]
    limit = prompt_logprobs.cache_limit(request)
    return tokens if limit is None else tokens[:limit]

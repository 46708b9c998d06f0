"""Continuous-batching scheduler: which requests run this step, with how many tokens.

One `schedule()` call per engine step, under a token budget:
1. running requests first, in admission order: a decoding request takes 1 token, a
   prefilling one takes its next chunk (at most `chunked_prefill_size`);
2. then waiting requests, ordered by the policy (fcfs, lpm = longest cached prefix first,
   priority = lowest `priority` value first, ties by arrival), while the batch has room;
   each starts from its longest cached prefix in the radix cache.
When blocks run out, the scheduler first evicts unused cached prefixes, then preempts the
most recently admitted running request (recompute: its blocks are released, its generated
tokens kept, and it goes back to the front of the queue).

Invariants: a RUNNING request holds exactly ceil(num_computed_tokens / page) blocks
between steps (plus the ones allocated for the step it is scheduled in); a WAITING or
FINISHED request holds none, and no radix lock.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.config import EngineConfig
from baton.services.engine.kv.radix_cache import RadixCache
from baton.services.engine.request import Request, RequestStatus


@dataclass
class ScheduledItem:
    """One request's share of a step: compute tokens [start, start + num_tokens)."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step brings the request up to date, so it samples a token."""
        return self.start + self.num_tokens == self.request.num_tokens


class Scheduler:
    """Owns the waiting queue, the running batch and block allocation for both."""

    def __init__(self, config: EngineConfig, pool: BlockPool, cache: Optional[RadixCache]) -> None:
        self.config = config
        self.pool = pool
        self.cache = cache
        self.page_size = config.page_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # --- queue ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request."""
        self.waiting.append(request)

    def has_work(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a request out of the queue or batch and give back everything it holds."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.release(request, cache_tokens=True)

    # --- scheduling ----------------------------------------------------------------
    def schedule(self) -> list[ScheduledItem]:
        """Pick this step's work; never returns a request twice."""
        budget = self.config.max_num_batched_tokens
        items: list[ScheduledItem] = []
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING or budget <= 0:
                continue
            n = min(request.num_uncomputed_tokens, self.config.prefill_chunk, budget)
            if self._reserve(request, n, items):
                items.append(ScheduledItem(request, request.num_computed_tokens, n))
                budget -= n
        self._admit(items, budget)
        return items

    def _admit(self, items: list[ScheduledItem], budget: int) -> None:
        for request in self._ordered_waiting():
            if len(self.running) >= self.config.max_running_requests:
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
            if n <= 0 or not self._can_fit(request, n):
                self._unmatch(request)
                return
            self._allocate(request, n)
            request.first_admission = False
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            items.append(ScheduledItem(request, request.num_computed_tokens, n))
            budget -= n

    def _ordered_waiting(self) -> list[Request]:
        policy = self.config.schedule_policy
        queue = list(self.waiting)
        if policy == "priority":
            queue.sort(key=lambda r: (r.params.priority, r.arrival))
        elif policy == "lpm" and self.cache is not None:
            queue.sort(key=lambda r: -self._peek_prefix_len(r))
        return queue

    def _peek_prefix_len(self, request: Request) -> int:
        return self.cache.match_prefix(request.all_token_ids[:-1], count=False).num_blocks * self.page_size

    # --- blocks --------------------------------------------------------------------
    def _blocks_needed(self, request: Request, n: int) -> int:
        total = -(-(request.num_computed_tokens + n) // self.page_size)
        return max(0, total - len(request.block_table))

    def _can_fit(self, request: Request, n: int) -> bool:
        need = self._blocks_needed(request, n)
        if self.pool.can_allocate(need):
            return True
        if self.cache is not None:
            self.cache.evict(need - self.pool.num_free)
        return self.pool.can_allocate(need)

    def _allocate(self, request: Request, n: int) -> None:
        request.block_table.extend(self.pool.allocate(self._blocks_needed(request, n)))

    def _reserve(self, request: Request, n: int, items: list[ScheduledItem]) -> bool:
        """Allocate blocks for n more tokens of a running request, preempting others if needed."""
        if self._blocks_needed(request, n) == 0:  # the common decode step: the last block has room
            return True
        while not self._can_fit(request, n):
            victim = self._pick_victim(request, items)
            if victim is None:
                self.preempt(request)
                return False
            self.preempt(victim)
        self._allocate(request, n)
        return True

    def _pick_victim(self, request: Request, items: list[ScheduledItem]) -> Optional[Request]:
        scheduled = {id(i.request) for i in items}
        candidates = [r for r in self.running if r is not request and id(r) not in scheduled]
        if not candidates:
            return None
        if self.config.schedule_policy == "priority":
            return max(candidates, key=lambda r: (r.params.priority, r.arrival))
        return candidates[-1]

    def preempt(self, request: Request) -> None:
        """Send a running request back to the front of the queue, releasing its blocks."""
        self.running.remove(request)
        self.release(request, cache_tokens=True)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # --- prefix cache --------------------------------------------------------------
    def _match_prefix(self, request: Request) -> None:
        if self.cache is None or request.block_table:
            return
        match = self.cache.match_prefix(request.all_token_ids[:-1])
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
        if self.cache is not None and cache_tokens and request.block_table:
            computed = request.all_token_ids[:request.num_computed_tokens]
            self.cache.insert(computed, request.block_table)
        if self.cache is not None and request.cache_node is not None:
            self.cache.unlock(request.cache_node)
        self.pool.release(request.block_table)
        request.block_table = []
        request.cache_node = None
        request.num_computed_tokens = 0

    def finish(self, request: Request) -> None:
        """Retire a finished request from the running batch (or from the queue: with overlap
        scheduling a request can be preempted in the step after the one that finished it)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.release(request, cache_tokens=True)

"""cache_aware: send a prompt where its prefix is probably cached. The default for prefill.

After the cache-aware policy of SGLang's model gateway (``policies/cache_aware.rs``). The
router keeps, per worker, an approximate prefix tree (``prefix_tree.PrefixTree``) of the
prompts it recently routed there, as a stand-in for that worker's radix cache.

Algorithm, for one prompt of ``n`` tokens over the candidate workers:

1. Load guard: with ``min`` the lowest guard load (``guard_load``) among the candidates,
   a worker is *overloaded* when ``load - min > balance_abs_threshold`` and
   ``load > min * balance_rel_threshold`` (both must hold, so small absolute gaps between
   idle workers and large gaps that are small relative to the load do not count), and
   the system is *imbalanced* when some worker is. The guard load is the work still to
   do: a prefill worker's ``WorkerView.load`` (the tokens it is prefilling or has
   queued); for a decode worker, its queued tokens plus 64 per request it runs (the
   router's in-flight count or its report, whichever is larger) plus ``1000 * kv_usage``.
   A decoding request's context is already computed and a decode step costs about the
   same per request whatever its length, so counting its context tokens (as ``load``
   does) made four 1k-token conversations look like 64 requests and the guard fire
   nearly always on long shared prompts. Overloaded workers are then left out
   of steps 2 and 3: affinity still chooses among the others (the least loaded one is
   always among them). SGLang drops affinity altogether there (pure min-load); that
   throws the cache away whenever one worker is busy, which on long shared prompts is
   most of the time (bench/RESULTS.md measured up to half the hits lost), while leaving
   only the overloaded workers out bounds the gap just as well.
2. Find the worker whose tree matches the longest prefix of the prompt (ties: lower
   load, then smaller address). If ``matched / n >= cache_threshold`` it wins: most of
   its prompt is likely cached there.
3. Otherwise (a prompt with little reuse anywhere) take the worker with the smallest
   tree (ties: lower load, then smaller address), as SGLang does: new prefixes go where
   the router has sent the fewest tokens lately, so unrelated prompts spread and cache
   space is used evenly; load is still guarded by step 1.

Precise prefix scores: with a KV-event index attached (``attach_index``, router/kv_index.py),
the match of every worker the index tracks comes from the blocks that worker really holds
(its KV events), and step 3 compares the tokens it really caches; workers the index does
not track (no events) keep the approximate tree. ``prefix_source(address)`` says which.
A tracked worker's score also counts the pages this router dispatched there that its events
have not stored yet (the index's *pending* blocks, short-lived: ``on_dispatch`` records
them), so a prompt sent while another with its prefix is still prefilling follows it to the
worker computing it, and step 3 counts them in the worker's size.
A tracked worker has no tree (it is dropped at its next dispatch, so memory stays within
the index's bound); should its events stop, its tree starts empty.

The policy learns only in ``on_dispatch``, which inserts the prompt into the chosen
worker's tree (whatever step chose it), and forgets a worker in ``on_worker_removed``.
Selection reads the trees without refreshing their recency. An empty prompt has a
match ratio of 0. Workers the policy has never dispatched to have an empty tree.

Parameters:
- ``cache_threshold`` (float in [0, 1], default 0.5): the matched fraction of the prompt
  needed to follow the cache rather than spread by tree size.
- ``balance_abs_threshold`` (float >= 0, default 4096): absolute load gap (load units:
  tokens, 64 per in-flight request; see ``router/types.py``) beyond which the system may
  count as imbalanced. 4096 = 64 in-flight requests, SGLang's default of 64 requests.
- ``balance_rel_threshold`` (float >= 1, default 1.5): the relative gap
  (max > min * this) that must also hold for imbalance.
- ``max_tree_tokens`` (int >= 1, default 2**20): the token budget of each worker's tree;
  least recently routed prefixes are evicted beyond it (memory stays bounded:
  about 100 bytes per token per worker in CPython at the default chunk size).
- ``chunk_size`` (int >= 1, default 16): tokens per trie edge; matches are counted in
  whole chunks (see ``prefix_tree``), so larger is faster but coarser.
"""
from __future__ import annotations

from typing import Sequence

from baton.router.policies.base import Policy, register_policy, require_workers
from baton.router.policies.prefix_tree import PrefixTree
from baton.router.types import Role, WorkerView


@register_policy
class CacheAwarePolicy(Policy):
    """Prefix affinity with a load-balance guard (see the module docstring)."""

    name = "cache_aware"

    def __init__(self, cache_threshold: float = 0.5, balance_abs_threshold: float = 4096.0,
                 balance_rel_threshold: float = 1.5, max_tree_tokens: int = 2 ** 20,
                 chunk_size: int = 16) -> None:
        if not 0.0 <= cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {balance_abs_threshold}")
        if balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {balance_rel_threshold}")
        if max_tree_tokens < 1:
            raise ValueError(f"max_tree_tokens must be >= 1, got {max_tree_tokens}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.max_tree_tokens = max_tree_tokens
        self.chunk_size = chunk_size
        self._trees: dict[str, PrefixTree] = {}
        self.index = None
        """The KV-event index (router/kv_index.py) scoring the workers it tracks; None: trees only."""

    def attach_index(self, index) -> None:
        """Score the workers `index` tracks by their KV events instead of the approximate tree."""
        self.index = index

    def prefix_source(self, address: str) -> str:
        """``kv_events`` when the worker is scored from the index, else ``approximate``."""
        return "kv_events" if self.index is not None and self.index.tracks(address) else "approximate"

    def select(self, workers: list[WorkerView], prompt_token_ids: Sequence[int]) -> WorkerView:
        require_workers(workers)
        if self.is_imbalanced(workers):
            workers = self.within_guard(workers)
        matches = self._matches(workers, prompt_token_ids)
        best = min(workers, key=lambda w: (-matches[w.address], w.load, w.address))
        n = len(prompt_token_ids)
        if n and matches[best.address] / n >= self.cache_threshold:
            return best
        return min(workers, key=lambda w: (self.tree_size(w.address), w.load, w.address))

    def _matches(self, workers: Sequence[WorkerView], tokens: Sequence[int]) -> dict[str, int]:
        index = self.index
        tracked = [w.address for w in workers if index is not None and index.tracks(w.address)]
        matches = index.matched_tokens(tokens, tracked) if tracked else {}
        for w in workers:
            if w.address not in matches:
                matches[w.address] = self._tree_match(w.address, tokens)
        return matches

    def on_dispatch(self, worker: WorkerView, prompt_token_ids: Sequence[int]) -> None:
        address = worker.address
        if self.index is not None and self.index.tracks(address):
            self._trees.pop(address, None)  # scored from its events: no tree (memory: the index's bound)
            self.index.dispatched(address, prompt_token_ids)  # pending there until its events store them
            return
        tree = self._trees.get(address)
        if tree is None:
            tree = self._trees[address] = PrefixTree(self.max_tree_tokens, self.chunk_size)
        tree.insert(prompt_token_ids)

    def on_worker_removed(self, address: str) -> None:
        self._trees.pop(address, None)

    @staticmethod
    def guard_load(w: WorkerView) -> float:
        """The load step 1 compares (see the module docstring)."""
        if w.role is Role.PREFILL:
            return w.load
        return w.queued_tokens + 64 * max(w.in_flight, w.running_requests + w.queued_requests) + 1000 * w.kv_usage

    def is_imbalanced(self, workers: Sequence[WorkerView]) -> bool:
        """Step 1 of the algorithm: is some worker overloaded (left out of the choice)?"""
        loads = [self.guard_load(w) for w in workers]
        high, low = max(loads), min(loads)
        return high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold

    def within_guard(self, workers: Sequence[WorkerView]) -> list[WorkerView]:
        """The workers that are not overloaded (step 1); never empty for a non-empty list."""
        loads = [self.guard_load(w) for w in workers]
        low = min(loads)
        most = max(low + self.balance_abs_threshold, low * self.balance_rel_threshold)
        return [w for w, load in zip(workers, loads) if load <= most]

    def matched_prefix_len(self, address: str, tokens: Sequence[int]) -> int:
        """Tokens of ``tokens`` cached on ``address``: from the KV-event index when it tracks the
        worker, else what its tree matches (0 for an unknown worker)."""
        if self.index is not None and self.index.tracks(address):
            return self.index.matched_tokens(tokens, [address])[address]
        return self._tree_match(address, tokens)

    def _tree_match(self, address: str, tokens: Sequence[int]) -> int:
        tree = self._trees.get(address)
        return tree.match(tokens) if tree is not None else 0

    def tree_size(self, address: str) -> int:
        """Tokens cached on ``address``: per the KV-event index when it tracks the worker (its
        pending blocks included), else held in its tree (0 for an unknown worker)."""
        index = self.index
        if index is not None and index.tracks(address):
            return index.cached_tokens(address) + index.pending_blocks(address) * index.block_size(address)
        tree = self._trees.get(address)
        return tree.size if tree is not None else 0

    def __repr__(self) -> str:
        return (f"CacheAwarePolicy(cache_threshold={self.cache_threshold}, "
                f"balance_abs_threshold={self.balance_abs_threshold}, "
                f"balance_rel_threshold={self.balance_rel_threshold}, "
                f"max_tree_tokens={self.max_tree_tokens}, chunk_size={self.chunk_size})")

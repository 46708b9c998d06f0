"""cache_aware routing and its bounded prefix tree."""
from __future__ import annotations

import random

import pytest

from baton.router.policies.cache_aware import CacheAwarePolicy
from baton.router.policies.prefix_tree import PrefixTree
from baton.router.types import Role, WorkerView


def workers(count: int = 4) -> list[WorkerView]:
    return [WorkerView(address=f"p{i}", role=Role.PREFILL) for i in range(count)]


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(32000) for _ in range(n)]


def route(policy: CacheAwarePolicy, pool: list[WorkerView], prompt: list[int]) -> WorkerView:
    chosen = policy.select(pool, prompt)
    policy.on_dispatch(chosen, prompt)
    return chosen


def test_shared_prefixes_stick_and_unrelated_prompts_spread() -> None:
    rng = random.Random(0)
    pool, policy = workers(4), CacheAwarePolicy()
    a = tokens(rng, 120)
    home = route(policy, pool, a)
    assert policy.matched_prefix_len(home.address, a) == 120
    others = set()
    for _ in range(20):
        assert route(policy, pool, a[:100] + tokens(rng, 50)) is home  # 96 of 150 matched
        others.add(route(policy, pool, tokens(rng, 150)).address)
    assert others == {w.address for w in pool} - {home.address}


def test_a_low_match_ratio_goes_by_tree_size() -> None:
    rng = random.Random(1)
    pool, policy = workers(2), CacheAwarePolicy(cache_threshold=0.8)
    a = tokens(rng, 64)
    home = route(policy, pool, a)
    assert policy.select(pool, a + tokens(rng, 64)) is not home  # 64/128 < 0.8
    assert policy.select(pool, a + tokens(rng, 8)) is home


def test_imbalance_falls_back_to_min_load() -> None:
    rng = random.Random(2)
    pool, policy = workers(3), CacheAwarePolicy(balance_abs_threshold=1000, balance_rel_threshold=1.5)
    a = tokens(rng, 200)
    home = route(policy, pool, a)
    home.queued_tokens = 800           # gap 800 <= 1000: affinity holds
    assert policy.select(pool, a) is home
    home.queued_tokens = 5000          # gap 5000 > 1000 and 5000 > 0 * 1.5
    assert policy.is_imbalanced(pool)
    chosen = policy.select(pool, a)
    assert chosen is not home and chosen.address == min(w.address for w in pool if w is not home)
    for w in pool:                     # both gaps must hold: 5000 vs 3500 is not 1.5x
        w.queued_tokens = max(w.queued_tokens, 3500)
    assert not policy.is_imbalanced(pool)
    assert policy.select(pool, a) is home


def test_tree_size_never_exceeds_the_bound() -> None:
    rng = random.Random(3)
    pool, policy = workers(2), CacheAwarePolicy(max_tree_tokens=500, chunk_size=16)
    shared = tokens(rng, 64)
    for i in range(300):
        prompt = (shared if i % 3 else []) + tokens(rng, rng.randrange(1, 300))
        route(policy, pool, prompt)
        for w in pool:
            assert policy.tree_size(w.address) <= 500
    assert all(policy.tree_size(w.address) > 400 for w in pool)
    huge = tokens(rng, 2000)  # longer than the whole budget: keeps its first 500 tokens
    policy.on_dispatch(pool[0], huge)
    assert policy.tree_size(pool[0].address) == 500
    assert policy.matched_prefix_len(pool[0].address, huge) == 496


def test_least_recently_routed_prefixes_are_evicted() -> None:
    rng = random.Random(4)
    (w,) = workers(1)
    policy = CacheAwarePolicy(max_tree_tokens=64, chunk_size=16)
    a, b, c = tokens(rng, 32), tokens(rng, 32), tokens(rng, 32)
    policy.on_dispatch(w, a)
    policy.on_dispatch(w, b)
    policy.on_dispatch(w, a)           # a is now more recent than b
    assert policy.tree_size(w.address) == 64
    policy.on_dispatch(w, c)           # over budget: b (least recent) goes
    assert policy.tree_size(w.address) == 64
    assert policy.matched_prefix_len(w.address, a) == 32
    assert policy.matched_prefix_len(w.address, b) == 0
    assert policy.matched_prefix_len(w.address, c) == 32


def test_eviction_trims_leaves_before_shared_prefixes() -> None:
    rng = random.Random(5)
    tree = PrefixTree(max_tokens=96, chunk_size=16)
    system = tokens(rng, 32)
    first, second = system + tokens(rng, 32), system + tokens(rng, 32)
    tree.insert(first)
    tree.insert(second)                # 32 shared + 32 + 32 = 96
    tree.insert(tokens(rng, 16))       # 112 > 96: one chunk, first's last, must go
    tree.check_integrity()
    assert tree.size == 96
    assert tree.match(first) == 48     # its oldest leaf went, the shared prefix stayed
    assert tree.match(second) == 64


def test_tree_invariants_hold_under_churn() -> None:
    rng = random.Random(6)
    tree = PrefixTree(max_tokens=300, chunk_size=8)
    prefixes = [tokens(rng, 40) for _ in range(5)]
    for _ in range(400):
        tree.insert(rng.choice(prefixes)[: rng.randrange(0, 41)] + tokens(rng, rng.randrange(0, 60)))
        assert tree.size <= 300
    tree.check_integrity()


def test_a_removed_worker_is_forgotten() -> None:
    rng = random.Random(7)
    pool, policy = workers(2), CacheAwarePolicy()
    a = tokens(rng, 100)
    home = route(policy, pool, a)
    policy.on_worker_removed(home.address)
    assert policy.tree_size(home.address) == 0
    assert policy.matched_prefix_len(home.address, a) == 0
    policy.on_worker_removed("never-seen")  # no error
    rest = [w for w in pool if w is not home]
    assert route(policy, rest, a) is rest[0]
    assert policy.select(pool, a) is rest[0]  # the affinity moved with the prompt


def test_matching_is_chunked_and_never_overcounts() -> None:
    tree = PrefixTree(max_tokens=1000, chunk_size=16)
    prompt = list(range(100))
    tree.insert(prompt)
    assert tree.match(prompt) == 100
    assert tree.match(prompt[:50] + [-1] * 50) == 48
    assert tree.match(prompt + [1, 2, 3]) == 96   # the stored short tail chunk differs
    assert tree.match([]) == 0
    with pytest.raises(ValueError):
        PrefixTree(max_tokens=0)


def test_an_overloaded_worker_is_left_out_but_affinity_chooses_among_the_rest() -> None:
    """The guard drops only the overloaded worker: a second worker holding the prefix still
    wins over idle workers that hold nothing (SGLang's guard would take the least loaded)."""
    rng = random.Random(3)
    pool, policy = workers(4), CacheAwarePolicy(balance_abs_threshold=1000, balance_rel_threshold=1.5)
    a = tokens(rng, 200)
    home = route(policy, pool, a)
    home.queued_tokens = 5000
    second = policy.select(pool, a)
    assert second is not home
    policy.on_dispatch(second, a)
    second.queued_tokens = 500     # busy, yet within the guard of the idle workers (0 + 1000)
    assert policy.is_imbalanced(pool) and home not in policy.within_guard(pool)
    assert policy.select(pool, a + tokens(rng, 20)) is second
    assert policy.select(pool, tokens(rng, 200)).queued_tokens == 0  # new prefixes still spread to idle ones


def test_the_decode_guard_counts_requests_not_context_tokens() -> None:
    """Four running 1k-token conversations are four requests of work (64 each), not 4,000 tokens:
    the default guard keeps their cached prefix; queued (uncomputed) tokens still count in full."""
    rng = random.Random(4)
    pool = [WorkerView(address=f"d{i}", role=Role.DECODE) for i in range(3)]
    policy = CacheAwarePolicy()
    a = tokens(rng, 1024)
    home = route(policy, pool, a)
    home.running_requests, home.running_tokens = 4, 4 * 1100
    assert home.load > 4096 and not policy.is_imbalanced(pool)
    assert policy.select(pool, a + tokens(rng, 64)) is home
    home.queued_tokens = 5000
    assert policy.is_imbalanced(pool) and policy.select(pool, a + tokens(rng, 64)) is not home

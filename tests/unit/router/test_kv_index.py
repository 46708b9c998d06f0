"""The router's KV-event index: prefix matches per worker from chain hashes, snapshots,
removals, the LRU bound on its entries, and the cache-aware policy scoring from it (with
the approximate tree kept for workers it does not track)."""
import pytest

from baton.protos.block_hash import block_hashes
from baton.router.kv_index import KVIndex
from baton.router.policies import make_policy
from baton.router.types import Role, WorkerView

BS = 4


def prompt(stem: int, length: int) -> list[int]:
    return [stem * 1000 + i for i in range(length)]


def test_matches_follow_the_blocks_each_worker_holds():
    index = KVIndex()
    a, b = prompt(1, 40), prompt(2, 40)
    index.replace("w1", BS, block_hashes(a, BS))             # all 10 pages of a
    index.replace("w2", BS, block_hashes(a[:16], BS) + block_hashes(b, BS))
    index.replace("w3", 8, block_hashes(a, 8)[:2])            # another block size
    assert index.matched_tokens(a + [5, 6], ["w1", "w2", "w3", "nobody"]) == {"w1": 40, "w2": 16, "w3": 16,
                                                                            "nobody": 0}
    assert index.matched_tokens(b, ["w1", "w2"]) == {"w1": 0, "w2": 40}
    index.removed("w1", block_hashes(a, BS)[3:4])              # a hole ends the match there
    assert index.matched_tokens(a, ["w1"]) == {"w1": 12}
    index.cleared("w2")
    assert index.tracks("w2") and index.matched_tokens(b, ["w2"]) == {"w2": 0}
    index.forget("w1")
    assert not index.tracks("w1") and index.blocks_of("w1") == set()
    assert index.entries == 2 and index.num_blocks == 2


def test_the_index_stays_within_its_bound_dropping_least_recently_used_blocks():
    index = KVIndex(max_entries=50)
    hot = prompt(9, 40)
    index.replace("w", BS, block_hashes(hot, BS))
    for stem in range(30):
        index.stored("w", block_hashes(prompt(stem, 20), BS))
        index.matched_tokens(hot, ["w"])                       # keeps the hot prefix recent
        assert index.entries <= 50
    assert index.matched_tokens(hot, ["w"]) == {"w": 40}
    assert index.dropped > 0 and index.entries == 50


def _views(*addresses):
    return [WorkerView(address=a, role=Role.DECODE) for a in addresses]


def test_cache_aware_scores_tracked_workers_from_the_index_and_the_others_from_its_tree():
    policy = make_policy("cache_aware")
    index = KVIndex()
    policy.attach_index(index)
    long = prompt(3, 64)
    workers = _views("a:1", "b:1", "c:1")
    policy.on_dispatch(workers[0], long)           # the tree believes a holds it...
    index.replace("a:1", BS, [])                   # ...but a's events say it holds nothing
    index.replace("b:1", BS, block_hashes(long, BS))
    assert policy.select(workers, long).address == "b:1"
    assert policy.prefix_source("a:1") == "kv_events" and policy.prefix_source("c:1") == "approximate"
    assert policy.matched_prefix_len("b:1", long) == 64 and policy.matched_prefix_len("a:1", long) == 0
    policy.on_dispatch(workers[2], long)            # c is untracked: its tree counts
    index.forget("b:1")
    assert policy.select(workers, long).address == "c:1"


def test_min_latency_and_weighted_policies():
    fast = WorkerView("fast:1", Role.DECODE, recent_ttft_ms=20, recent_itl_ms=5, running_requests=4)
    slow = WorkerView("slow:1", Role.DECODE, recent_ttft_ms=200, recent_itl_ms=30, running_requests=4)
    new = WorkerView("new:1", Role.DECODE)
    policy = make_policy("min_latency")
    assert policy.select([slow, fast], []).address == "fast:1"
    fast.in_flight = 60                              # the router just loaded it: expected latency scales
    assert policy.select([slow, fast], []).address == "slow:1"
    assert policy.select([slow, new], []).address == "new:1"  # no sample yet: optimistic
    assert make_policy("min_latency").select([WorkerView("b:1", Role.DECODE), WorkerView("a:1", Role.DECODE)],
                                             []).address == "a:1"

    weighted = make_policy("weighted", weights="big:1=3,small:1=1")
    views = {a: WorkerView(a, Role.DECODE) for a in ("big:1", "small:1")}
    counts = {a: 0 for a in views}
    for _ in range(400):
        chosen = weighted.select(list(views.values()), [])
        counts[chosen.address] += 1
        chosen.in_flight += 1
    assert counts == {"big:1": 300, "small:1": 100}
    with pytest.raises(ValueError, match="weight > 0"):
        make_policy("weighted", weights="a:1=0")
    with pytest.raises(ValueError, match="host:port=weight"):
        make_policy("weighted", weights="a:1")


def test_pending_blocks_score_until_the_events_store_them_and_expire_or_drop_at_the_bound():
    now = [0.0]
    index = KVIndex(pending_ttl_s=2.0, max_pending=12, clock=lambda: now[0])
    a, b = prompt(1, 40), prompt(2, 40)
    index.replace("w1", BS, block_hashes(a[:8], BS))
    index.replace("w2", BS, [])
    index.dispatched("w1", a)                                   # pages 3..10 of a are pending on w1
    index.dispatched("untracked", a)                            # no block size known: nothing recorded
    assert index.matched_tokens(a, ["w1", "w2", "untracked"]) == {"w1": 40, "w2": 0, "untracked": 0}
    assert (index.entries, index.pending_entries, index.pending_blocks("w1")) == (2, 8, 8)
    index.stored("w1", block_hashes(a, BS)[2:6])                # the worker's events confirm 4 of them
    assert (index.entries, index.pending_entries, index.pending_confirmed) == (6, 4, 4)
    now[0] = 1.0
    index.dispatched("w2", b)                                   # 10 more: the oldest 2 of w1's are dropped
    assert index.pending_entries == 12 and index.pending_expired == 2 and index.pending_blocks("w1") == 2
    assert index.matched_tokens(a, ["w1"]) == {"w1": 24} and index.matched_tokens(b, ["w2"]) == {"w2": 40}
    now[0] = 2.5                                                # w1's are past their 2 s, w2's are not
    assert index.pending_blocks("w1") == 0 and index.pending_blocks("w2") == 10 and index.pending_expired == 4
    index.forget("w2")                                          # a broken stream forgets pending too
    assert index.pending_entries == 0 and index.matched_tokens(b, ["w2"]) == {"w2": 0}
    off = KVIndex(pending_ttl_s=0)
    off.replace("w", BS, [])
    off.dispatched("w", a)
    assert off.pending_entries == 0

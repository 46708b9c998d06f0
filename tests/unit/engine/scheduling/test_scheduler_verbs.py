"""The scheduler's public verbs on a bare pool and cache (no model): external reservations
(reserve_external, reservation, admit_running, cancel_reservation), can_reserve with
eviction, the counts and snapshots, and starved_request; exact block ids and counts.

Pool of 6 blocks of 4 tokens; blocks are handed out in FIFO order of being freed."""
import pytest

from baton.services.engine.config import EngineConfig
from baton.services.engine.device_defaults import resolve_config
from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.null_cache import NullPrefixCache
from baton.services.engine.kv.radix_cache import RadixCache
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.scheduling.scheduler import ScheduledItem, Scheduler

PAGE = 4
PREFIX = [10, 11, 12, 13]


def make_scheduler(null_cache=False, **options):
    config = resolve_config(EngineConfig(page_size=PAGE, **options), "cpu")
    pool = BlockPool(6)
    cache = NullPrefixCache(pool, PAGE) if null_cache else RadixCache(pool, PAGE)
    return Scheduler(config, pool, cache)


def request(rid, prompt, arrival=0):
    return Request(request_id=rid, parent_id=rid, index=0, prompt_token_ids=list(prompt),
                   params=SamplingParams(max_tokens=4), arrival=arrival)


IDLE = dict(running=0, waiting=0, reserved=0, running_tokens=0, waiting_tokens=0, reserved_blocks=0,
            reserved_tokens=0)


def counts(s):
    return dict(running=s.num_running, waiting=s.num_waiting, reserved=s.num_reserved,
                running_tokens=s.running_tokens, waiting_tokens=s.waiting_tokens, reserved_blocks=s.reserved_blocks,
                reserved_tokens=s.reserved_tokens)


def finish_after_one_decode(s, r):
    """What the engine does: the first token arrives, one decode step runs, the request finishes."""
    r.output_token_ids.append(7)
    [item] = s.schedule()
    assert (item.request, item.start, item.num_tokens) == (r, len(r.prompt_token_ids), 1)
    r.num_computed_tokens += 1
    r.status = RequestStatus.FINISHED
    s.finish(r)


def test_reserve_external_then_admit_running():
    s = make_scheduler()
    r = request("a", PREFIX + [20, 21, 22])  # 7 tokens: 2 blocks
    assert s.reserve_external(r)
    assert r.block_table == [0, 1] and r.num_computed_tokens == 0 and r.num_cached_tokens == 0
    assert r.status is RequestStatus.WAITING and r.first_admission is False
    assert s.reservation("a") is r and s.reservation("b") is None
    assert counts(s) == IDLE | dict(reserved=1, reserved_blocks=2, reserved_tokens=7)
    assert not s.has_work() and s.pool.num_free == 4
    assert s.schedule() == []  # a reservation is in no queue

    s.admit_running(r)
    assert r.num_computed_tokens == 7 and r.status is RequestStatus.RUNNING
    assert s.running_requests() == (r,) and s.reservation("a") is None
    assert counts(s) == IDLE | dict(running=1, running_tokens=7)
    assert s.has_work()
    with pytest.raises(KeyError):
        s.admit_running(r)  # no longer reserved

    finish_after_one_decode(s, r)  # 8 computed tokens: both pages cached
    assert s.cache.cached_blocks == 2 and s.cache.locked_blocks == 0 and s.pool.num_free == 4
    assert counts(s) == IDLE


def test_reserve_external_shares_the_cached_prefix_and_cancel_gives_it_back():
    s = make_scheduler()
    first = request("a", PREFIX + [20, 21, 22])
    s.reserve_external(first)
    s.admit_running(first)
    first.status = RequestStatus.FINISHED
    s.finish(first)  # 7 computed tokens: its first page (block 0) cached, block 1 freed
    assert s.cache.cached_blocks == 1 and s.pool.num_free == 5

    second = request("b", PREFIX + [30, 31, 32, 33, 34])  # 9 tokens: 3 blocks, the first one cached
    assert s.reserve_external(second)
    assert second.block_table == [0, 2, 3]  # free queue was [2, 3, 4, 5, 1]
    assert second.num_computed_tokens == 4 and second.num_cached_tokens == 4
    assert s.pool.refcount(0) == 2 and s.cache.locked_blocks == 1
    assert counts(s) == IDLE | dict(reserved=1, reserved_blocks=3, reserved_tokens=9) and s.pool.num_free == 3

    s.cancel_reservation(second)
    assert second.block_table == [] and second.cache_node is None and second.num_computed_tokens == 0
    assert s.reservation("b") is None and s.num_reserved == 0 and s.reserved_blocks == 0
    assert s.cache.cached_blocks == 1 and s.cache.locked_blocks == 0  # nothing of b was cached
    assert s.pool.refcount(0) == 1 and s.pool.num_free == 5
    with pytest.raises(KeyError):
        s.cancel_reservation(second)


def test_reserve_external_refused_holds_nothing():
    s = make_scheduler()
    warm = request("warm", PREFIX + [20])
    s.reserve_external(warm)
    s.admit_running(warm)
    warm.status = RequestStatus.FINISHED
    s.finish(warm)  # block 0 cached
    big = request("big", PREFIX + list(range(40, 61)))  # 25 tokens: 7 blocks, 6 beyond the cached one
    assert not s.reserve_external(big)
    assert big.block_table == [] and big.cache_node is None and big.num_computed_tokens == 0
    assert s.num_reserved == 0 and s.reservation("big") is None
    assert s.cache.cached_blocks == 1 and s.cache.locked_blocks == 0  # the locked prefix was not evicted
    assert s.pool.num_free == 5


def test_can_reserve_evicts_unused_prefixes_and_allocates_nothing():
    s = make_scheduler()
    warm = request("warm", PREFIX + [20])
    s.reserve_external(warm)
    s.admit_running(warm)
    warm.status = RequestStatus.FINISHED
    s.finish(warm)
    assert s.cache.cached_blocks == 1 and s.pool.num_free == 5
    r = request("r", range(100, 124))
    assert s.can_reserve(r, 20)  # 5 blocks: free already, nothing evicted
    assert s.cache.cached_blocks == 1 and s.pool.num_free == 5
    assert s.can_reserve(r, 24)  # 6 blocks: the cached prefix is evicted
    assert s.cache.cached_blocks == 0 and s.pool.num_free == 6 and r.block_table == []
    assert not s.can_reserve(r, 25)  # 7 blocks never fit


def test_counts_snapshots_and_starved_request():
    s = make_scheduler(max_running_requests=1)
    assert s.starved_request() is None
    a, b = request("a", range(3, 9), 0), request("b", range(3, 13), 1)
    s.add(a)
    s.add(b)
    assert s.waiting_requests() == (a, b) and s.running_requests() == ()
    assert s.starved_request() is a  # nothing runs: the head is the one that could not start
    [item] = s.schedule()
    assert (item.request, item.start, item.num_tokens) == (a, 0, 6) and a.block_table == [0, 1]
    assert s.running_requests() == (a,) and s.waiting_requests() == (b,)
    assert counts(s) == IDLE | dict(running=1, waiting=1, running_tokens=6, waiting_tokens=10)
    assert s.starved_request() is None  # something runs
    s.remove(b)
    s.remove(a)
    assert counts(s) == IDLE


def test_null_cache_reserves_the_whole_prompt_and_caches_nothing():
    s = make_scheduler(null_cache=True)
    first = request("a", PREFIX + [20, 21, 22])
    s.reserve_external(first)
    s.admit_running(first)
    finish_after_one_decode(s, first)
    assert s.pool.num_free == 6 and s.cache.cached_blocks == 0
    again = request("b", PREFIX + [20, 21, 22])
    assert s.reserve_external(again)
    assert again.block_table == [2, 3] and again.num_computed_tokens == 0 and again.num_cached_tokens == 0
    s.cancel_reservation(again)
    assert s.pool.num_free == 6


def test_scheduled_item_samples_only_when_up_to_date():
    r = request("a", range(3, 9))
    assert ScheduledItem(r, 0, 6).samples and not ScheduledItem(r, 0, 4).samples

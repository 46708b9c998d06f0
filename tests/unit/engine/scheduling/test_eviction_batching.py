"""A step whose running requests are short of blocks evicts cached prefixes in one `evict` call,
not one per request, and the least recently used prefixes
go first, as they did with one eviction per request. Bare pool and cache, no model."""
from baton.services.engine.config import EngineConfig
from baton.services.engine.device_defaults import resolve_config
from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.radix_cache import RadixCache
from baton.services.engine.request import Request, RequestStatus
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.scheduling.scheduler import Scheduler

PAGE = 4


def request(rid, first_token):
    return Request(request_id=rid, parent_id=rid, index=0, prompt_token_ids=list(range(first_token, first_token + 8)),
                   params=SamplingParams(max_tokens=4), arrival=0)


def prefill(scheduler, requests):
    """Admit the requests, count their prompts computed and give each its first token."""
    for r in requests:
        scheduler.add(r)
    items = scheduler.schedule()
    assert [i.request for i in items] == requests
    for r in requests:
        r.num_computed_tokens = len(r.prompt_token_ids)
        r.output_token_ids.append(3)


def test_running_requests_short_of_blocks_evict_once_in_lru_order():
    pool = BlockPool(16)
    cache = RadixCache(pool, PAGE)
    scheduler = Scheduler(resolve_config(EngineConfig(page_size=PAGE), "cpu"), pool, cache)
    old = [request(f"old{i}", 100 + 10 * i) for i in range(4)]
    prefill(scheduler, old)
    for r in old:  # finished: their two whole pages each stay cached
        r.status = RequestStatus.FINISHED
        scheduler.finish(r)
    assert cache.cached_blocks == 8 and pool.num_free == 8
    running = [request(f"r{i}", 200 + 10 * i) for i in range(4)]
    prefill(scheduler, running)
    assert pool.num_free == 0

    calls = []
    evict = cache.evict
    cache.evict = lambda n: calls.append(n) or evict(n)
    items = scheduler.schedule()  # every running request's next token opens a new page
    assert [(i.request, i.start, i.num_tokens) for i in items] == [(r, 8, 1) for r in running]
    assert calls == [4], "one eviction for the running requests' whole share"
    assert scheduler.num_preemptions == 0
    assert [cache.match_prefix(r.prompt_token_ids, count=False).num_blocks for r in old] == [0, 0, 2, 2]

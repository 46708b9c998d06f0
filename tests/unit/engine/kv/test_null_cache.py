"""NullPrefixCache: the radix cache's interface, matching nothing, caching nothing, counting
nothing; an engine with the radix cache disabled runs on it and gives every block back."""
import inspect

import pytest

from baton.services.engine.config import EngineConfig
from baton.services.engine.engine import Engine
from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.null_cache import NullPrefixCache
from baton.services.engine.kv.prefix_cache import PrefixCache
from baton.services.engine.kv.radix_cache import RadixCache
from baton.services.engine.sampling_params import SamplingParams
from tests.helpers.tiny_models import make_tiny_model

PAGE = 4


def interface_names() -> set[str]:
    names = {n for n, _ in inspect.getmembers(PrefixCache) if not n.startswith("_")}
    return names | set(PrefixCache.__annotations__)


@pytest.mark.parametrize("cls", [RadixCache, NullPrefixCache])
def test_both_caches_offer_the_whole_interface(cls):
    cache = cls(BlockPool(4), PAGE)
    missing = sorted(n for n in interface_names() if not hasattr(cache, n))
    assert not missing
    assert interface_names() >= {"match_prefix", "insert", "lock", "unlock", "evict", "reset", "check_integrity",
                                 "evictable_blocks", "hit_rate", "cached_blocks", "locked_blocks",
                                 "tokens_matched", "tokens_looked_up", "page_size"}


def test_matches_nothing_caches_nothing_counts_nothing():
    pool = BlockPool(8)
    cache = NullPrefixCache(pool, PAGE)
    blocks = pool.allocate(3)
    assert cache.insert(list(range(12)), blocks) == 0
    assert [pool.refcount(b) for b in blocks] == [1, 1, 1]  # no reference taken
    match = cache.match_prefix(list(range(12)))
    assert match.blocks == [] and match.num_blocks == 0 and match.node is cache.root
    assert cache.match_prefix(list(range(12)), count=False).blocks == []
    cache.lock(match.node)
    assert cache.locked_blocks == 0
    cache.unlock(match.node)
    cache.unlock(match.node)  # nothing is counted, so nothing can go below zero
    assert cache.evict(5) == 0
    assert (cache.cached_blocks, cache.evictable_blocks, cache.hit_rate) == (0, 0, 0.0)
    assert (cache.tokens_matched, cache.tokens_looked_up) == (0, 0)
    cache.reset()
    cache.check_integrity()
    pool.release(blocks)
    assert pool.num_free == 8


def test_engine_without_radix_cache_recomputes_a_repeated_prompt(tmp_path):
    folder = make_tiny_model("llama", tmp_path)
    engine = Engine(EngineConfig(model=str(folder), page_size=PAGE, kv_cache_tokens=256, num_threads=1,
                                 disable_radix_cache=True))
    assert isinstance(engine.parts.cache, NullPrefixCache)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = list(range(3, 20))
    for rid in ("first", "again"):
        engine.add_request(rid, prompt, params)
        schedules = []
        deltas = []
        while engine.has_unfinished():
            deltas += engine.step()
            schedules.append(engine.last_schedule)
        assert schedules[0] == [(rid, 0, len(prompt))]  # the whole prompt, nothing matched
        assert {d.num_cached_tokens for d in deltas if d.finish_reason} == {0}
        assert engine.pool.num_free == engine.pool.num_blocks  # nothing stays cached
    stats = engine.stats()
    assert (stats.cached_blocks, stats.prefix_hit_rate, stats.prefix_tokens_looked_up) == (0, 0.0, 0)
    engine.check_idle_integrity()

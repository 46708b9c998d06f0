"""RadixCache: page-aligned matching, exact blocks, splitting, locking, LRU eviction, integrity."""
import pytest

from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.radix_cache import RadixCache

PAGE = 4


@pytest.fixture
def cache():
    pool = BlockPool(16)
    cache = RadixCache(pool, PAGE)
    yield cache
    cache.check_integrity()
    pool.check_integrity()
    # every test leaves the pool full again once the cache lets go
    assert cache.locked_blocks == 0
    cache.reset()
    assert pool.num_free == pool.num_blocks


def insert_request(cache, tokens):
    """What a finished request does: allocate blocks for its pages, insert, release its references."""
    blocks = cache.pool.allocate(len(tokens) // PAGE)
    present = cache.insert(tokens, blocks)
    cache.pool.release(blocks)
    return blocks, present


def test_match_returns_exact_blocks_of_whole_pages(cache):
    blocks, present = insert_request(cache, list(range(10)))  # 2 whole pages, 2 tokens dropped
    assert present == 0 and blocks == [0, 1]
    assert cache.cached_blocks == 2
    match = cache.match_prefix(list(range(8)) + [99])
    assert match.blocks == [0, 1]
    assert cache.match_prefix([0, 1, 2, 3, 4, 5, 6]).blocks == [0]
    assert cache.match_prefix([7, 7, 7, 7]).blocks == []
    assert cache.tokens_matched == 8 + 4 and cache.tokens_looked_up == 9 + 7 + 4
    assert cache.hit_rate == pytest.approx(12 / 20)


def test_insert_of_shared_prefix_splits_and_keeps_existing_blocks(cache):
    insert_request(cache, [1] * 4 + [2] * 4 + [3] * 4)               # blocks 0,1,2
    blocks, present = insert_request(cache, [1] * 4 + [2] * 4 + [9] * 4)  # blocks 3,4,5: only 5 adopted
    assert present == 8 and blocks == [3, 4, 5]
    assert cache.cached_blocks == 4
    assert cache.pool.num_free == 16 - 4
    assert cache.pool.refcount(3) == 0 and cache.pool.refcount(4) == 0  # duplicates went back
    assert cache.match_prefix([1] * 4 + [2] * 4 + [9] * 4).blocks == [0, 1, 5]
    assert cache.match_prefix([1] * 4 + [2] * 4 + [3] * 4).blocks == [0, 1, 2]
    root_children = list(cache.root.children.values())
    assert len(root_children) == 1 and len(root_children[0].key) == 8  # split after two pages


def test_match_inside_a_node_splits_it_so_locks_are_exact(cache):
    insert_request(cache, list(range(12)))
    match = cache.match_prefix(list(range(4)) + [50, 51, 52, 53])
    assert match.blocks == [0] and len(match.node.key) == PAGE
    cache.lock(match.node)
    assert cache.locked_blocks == 1 and cache.evictable_blocks == 2
    assert cache.evict(10) == 2          # only the unlocked tail goes
    assert cache.match_prefix(list(range(12))).blocks == [0]
    cache.unlock(match.node)
    assert cache.locked_blocks == 0


def test_eviction_is_lru_over_unlocked_leaves(cache):
    insert_request(cache, [1] * 8)   # blocks 0,1
    insert_request(cache, [2] * 8)   # blocks 2,3
    insert_request(cache, [3] * 8)   # blocks 4,5
    cache.match_prefix([1] * 8)      # touch the first: now [2]* is least recently used
    assert cache.evict(1) == 2       # a whole leaf goes
    assert cache.match_prefix([2] * 8).blocks == []
    assert cache.match_prefix([1] * 8).blocks == [0, 1]
    assert cache.match_prefix([3] * 8).blocks == [4, 5]
    assert cache.pool.refcount(2) == 0 and cache.pool.refcount(3) == 0


def test_evicting_a_leaf_exposes_its_parent_for_eviction(cache):
    insert_request(cache, [1] * 4 + [2] * 4)
    insert_request(cache, [1] * 4 + [3] * 4)
    assert cache.evict(3) == 3
    assert cache.cached_blocks == 0


def test_locked_path_survives_eviction_and_reset_refuses(cache):
    insert_request(cache, list(range(8)))
    match = cache.match_prefix(list(range(8)) + [1])
    cache.lock(match.node)
    assert cache.evict(100) == 0
    with pytest.raises(ValueError):
        cache.reset()
    cache.unlock(match.node)
    with pytest.raises(ValueError):
        cache.unlock(match.node)


def test_integrity_check_catches_corruption(cache):
    insert_request(cache, list(range(8)))
    node = next(iter(cache.root.children.values()))
    node.blocks.append(7)
    with pytest.raises(AssertionError):
        cache.check_integrity()
    node.blocks.pop()

"""RadixCache eviction through its lazily kept heap of unlocked leaves evicts exactly what the
former full-tree walk did: the same pages, in the same order, with the same KV events, for the
same history of random requests (match + lock, insert + unlock, aborts, look-ahead matches,
evictions, resets); and the heap holds at most one entry per node however often nodes are touched.

The reference is the former algorithm, kept here: a `RadixCache` whose `evict` collects every
unlocked leaf by walking the tree and heapifies them on each call (it ignores the heap, whose
upkeep in match / insert / unlock changes nothing else in the tree)."""
import heapq
import random

from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.radix_cache import RadixCache

PAGE = 2


class WalkingRadixCache(RadixCache):
    """The eviction of RadixCache before the heap: one tree walk per `evict` call."""

    def evict(self, num_blocks: int) -> int:
        heap = [(n.last_access, id(n), n) for n in self._walk_leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        evicted = 0
        while evicted < num_blocks and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key[:self.page_size]]
            if self.events is not None:
                self.events.removed(self._path(parent), leaf.key)
            self.pool.release(leaf.blocks)
            self.cached_blocks -= len(leaf.blocks)
            evicted += len(leaf.blocks)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return evicted

    def _walk_leaves(self):
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves

    def _offer(self, node) -> None:
        """No heap: the walk finds the leaves."""


class Log:
    """A KV event sink that records every call."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def stored(self, prefix, tokens) -> None:
        self.events.append(("stored", tuple(prefix), tuple(tokens)))

    def removed(self, prefix, tokens) -> None:
        self.events.append(("removed", tuple(prefix), tuple(tokens)))

    def cleared(self) -> None:
        self.events.append(("cleared",))


class Twin:
    """One cache and its pool, driven like the scheduler drives them."""

    def __init__(self, cls, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.cache = cls(self.pool, PAGE)
        self.log = Log()
        self.cache.events = self.log
        self.running: list[tuple[list[int], object, list[int]]] = []

    def admit(self, tokens: list[int]):
        """Match + lock + share, evict for the missing pages, allocate; None when it does not fit."""
        match = self.cache.match_prefix(tokens)
        self.cache.lock(match.node)
        self.pool.share(match.blocks)
        need = len(tokens) // PAGE - match.num_blocks
        evicted = self.cache.evict(need - self.pool.num_free) if need > self.pool.num_free else 0
        if need > self.pool.num_free:
            self.cache.unlock(match.node)
            self.pool.release(match.blocks)
            return ("full", match.blocks, evicted)
        self.running.append((tokens, match.node, list(match.blocks) + self.pool.allocate(need)))
        return ("admitted", match.blocks, evicted)

    def finish(self, i: int, cache_tokens: bool, keep: int):
        tokens, node, blocks = self.running.pop(i)
        present = self.cache.insert(tokens[:keep * PAGE], blocks[:keep]) if cache_tokens else None
        self.cache.unlock(node)
        self.pool.release(blocks)
        return present

    def state(self):
        c = self.cache
        return (list(self.pool._free), c.cached_blocks, c.locked_blocks, c.evictable_blocks, len(self.log.events))


def stale_keys(cache: RadixCache) -> int:
    """Heap entries whose node was touched since they were pushed (evict re-keys them)."""
    return sum(key < node.last_access for key, _, node in cache._heap)


def run_history(seed: int, steps: int = 250) -> int:
    """Drive both caches through one random history, comparing after every step; returns the
    evict calls made while some heap entry had a stale key."""
    rng = random.Random(seed)
    new, ref = Twin(RadixCache, 40), Twin(WalkingRadixCache, 40)
    bases = [[rng.randrange(3) for _ in range(rng.randrange(1, 5) * PAGE)] for _ in range(4)]
    stale_evictions = 0
    for step in range(steps):
        op = rng.random()
        stale = stale_keys(new.cache) > 0
        if op < 0.35:
            base = rng.choice(bases)
            tokens = base[:rng.randrange(0, len(base) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 9))]
            assert new.admit(tokens) == ref.admit(tokens), (seed, step)
        elif op < 0.6 and new.running:
            i = rng.randrange(len(new.running))
            cache_tokens, keep = rng.random() < 0.85, rng.randrange(0, len(new.running[i][2]) + 1)
            assert new.finish(i, cache_tokens, keep) == ref.finish(i, cache_tokens, keep), (seed, step)
        elif op < 0.75:
            tokens = rng.choice(bases) + [rng.randrange(3) for _ in range(rng.randrange(0, 5))]
            ref.cache.match_prefix(tokens, count=False)
            tokens = new.cache._path(new.cache.match_prefix(tokens, count=False).node)  # touch that node itself
            for _ in range(rng.choice([1, 1, 20])):  # look-ahead matches (lpm) touch without pushing
                assert new.cache.match_prefix(tokens, count=False).blocks == \
                    ref.cache.match_prefix(tokens, count=False).blocks, (seed, step)
        elif op < 0.97:
            k = rng.randrange(1, 8)
            assert new.cache.evict(k) == ref.cache.evict(k), (seed, step)
            stale_evictions += stale
        elif not new.running:
            new.cache.reset()
            ref.cache.reset()
        assert new.log.events == ref.log.events, (seed, step)
        assert new.state() == ref.state(), (seed, step)
        new.cache.check_integrity()
        new.pool.check_integrity()
    for twin in (new, ref):
        while twin.running:
            twin.finish(0, True, len(twin.running[0][2]))
        twin.cache.reset()
    assert new.log.events == ref.log.events and new.state() == ref.state()
    assert new.pool.num_free == new.pool.num_blocks and new.cache._heap == []
    return stale_evictions


def test_heap_eviction_matches_the_tree_walk_over_random_histories():
    assert sum(run_history(seed) for seed in range(60)) > 0, "no eviction had entries to re-key"


def test_touches_push_nothing_and_eviction_stays_lru():
    cache = RadixCache(BlockPool(64), PAGE)
    prompts = [[i, i, j, j] for i in range(4) for j in range(4)]
    for p in prompts:
        blocks = cache.pool.allocate(2)
        cache.insert(p, blocks)
        cache.pool.release(blocks)
    rng = random.Random(0)
    for _ in range(5000):
        cache.match_prefix(rng.choice(prompts), count=False)
    assert len(cache._heap) == len(prompts)  # one entry per leaf, whatever the touches
    cache.check_integrity()
    leaves = [leaf for top in cache.root.children.values() for leaf in top.children.values()]
    oldest = cache._path(min(leaves, key=lambda n: n.last_access))
    assert cache.evict(1) == 1
    assert [p for p in prompts if cache.match_prefix(p, count=False).num_blocks == 1] == [oldest]
    cache.reset()
    assert cache.pool.num_free == 64 and cache._heap == []

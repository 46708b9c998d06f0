"""The prefix cache: a page-aligned radix tree over token ids whose nodes hold KV blocks.

Invariants (checked by `check_integrity`):
- every node but the root has a key of whole pages, `len(key) == len(blocks) * page_size`,
  and is found in its parent's children under its first page;
- no two children of a node share a first page (they would have been merged);
- the tree holds one pool reference per block of every node;
- `lock_ref` of a node counts the requests using it or a descendant; locked nodes are
  never evicted, and `locked_blocks` counts the blocks of nodes with lock_ref > 0;
- eviction removes least-recently-used unlocked leaves first (a node's `last_access` is never
  below a child's, and the nodes one call touches lie on one path, so no two leaves share a
  `last_access`: the order is total);
- the eviction heap holds at most one entry `(key, seq, node)` per node of the tree, with
  `node.heap_entry == seq` and `key <= node.last_access`; every unlocked leaf has one.

Eviction pops that heap instead of walking the tree, so its cost grows with the leaves it
evicts (and the entries it re-keys), not with the tree. An entry is pushed when a leaf is
created, when a leaf's lock count drops to 0 and when an eviction leaves a parent childless,
each time only if the node has none. A match or insert that touches a node leaves its entry
alone (the key is then below `last_access`); `evict` re-keys such an entry when it pops it and
drops the entry of a node locked or given a child since (the node is pushed again when it is
an unlocked leaf once more). The entry popped with an exact key is the LRU unlocked leaf.

Events: when `events` holds a `KVEventSink` (kv_events.py), every page that enters the
tree is reported as stored and every evicted page as removed (with the token path before
it), and `reset` ends with `cleared`; with no sink (the default) nothing is computed.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.kv_events import KVEventSink

_EVICTED = -2
"""`RadixNode.heap_entry` of a node evicted from the tree (never pushed again)."""


@dataclass(eq=False)
class RadixNode:
    """A run of whole pages shared by every sequence passing through it."""

    key: tuple[int, ...] = ()
    blocks: list[int] = field(default_factory=list)
    parent: Optional["RadixNode"] = None
    children: dict[tuple[int, ...], "RadixNode"] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0
    heap_entry: int = -1
    """Sequence number of the node's eviction-heap entry (-1: none, -2: evicted)."""


@dataclass
class PrefixMatch:
    """The cached part of a token sequence."""

    blocks: list[int]
    """Blocks holding the matched pages, in order."""
    node: RadixNode
    """Deepest node of the match (lock it while using the blocks)."""

    @property
    def num_blocks(self) -> int:
        """Matched pages."""
        return len(self.blocks)


class RadixCache:
    """Page-granular RadixAttention-style prefix cache over a `BlockPool`."""

    def __init__(self, pool: BlockPool, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self.root = RadixNode()
        self.cached_blocks = 0
        self.locked_blocks = 0
        self.tokens_looked_up = 0
        self.tokens_matched = 0
        self._clock = itertools.count(1)
        self._seq = itertools.count()
        self._heap: list[tuple[int, int, RadixNode]] = []
        self.events: Optional[KVEventSink] = None
        """Told of every page stored and evicted (None: nobody listens)."""

    # --- queries -------------------------------------------------------------------
    @property
    def evictable_blocks(self) -> int:
        """Blocks that eviction could return to the pool."""
        return self.cached_blocks - self.locked_blocks

    @property
    def hit_rate(self) -> float:
        """Tokens matched / tokens looked up since start (0 when nothing was looked up)."""
        return self.tokens_matched / self.tokens_looked_up if self.tokens_looked_up else 0.0

    def match_prefix(self, tokens: Sequence[int], count: bool = True) -> PrefixMatch:
        """Longest cached whole-page prefix of `tokens`; splits a node so the match ends on one.
        `count=False` leaves the hit statistics alone (a look-ahead, not a use)."""
        page = self.page_size
        usable = len(tokens) - len(tokens) % page
        node, blocks, pos = self.root, [], 0
        now = next(self._clock)
        while pos < usable:
            child = node.children.get(tuple(tokens[pos:pos + page]))
            if child is None:
                break
            common = self._common_pages(child.key, tokens, pos)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            blocks.extend(child.blocks)
            pos += len(child.key)
            node = child
        if count:
            self.tokens_looked_up += len(tokens)
            self.tokens_matched += pos
        return PrefixMatch(blocks=blocks, node=node)

    # --- updates -------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> int:
        """Cache the whole pages of `tokens` held in `blocks`; returns tokens already cached.

        The tree takes its own reference on blocks of new pages; for pages it already had,
        the caller's blocks are not adopted. Either way the caller keeps (and later releases)
        its own references.
        """
        page = self.page_size
        usable = min(len(tokens) - len(tokens) % page, len(blocks) * page)
        node, pos, present = self.root, 0, None
        now = next(self._clock)
        while pos < usable:
            child = node.children.get(tuple(tokens[pos:pos + page]))
            if child is None:
                present = pos if present is None else present
                new_blocks = list(blocks[pos // page:usable // page])
                self.pool.share(new_blocks)
                leaf = RadixNode(key=tuple(tokens[pos:usable]), blocks=new_blocks, parent=node, last_access=now)
                node.children[leaf.key[:page]] = leaf
                self.cached_blocks += len(new_blocks)
                self._offer(leaf)
                if self.events is not None:
                    self.events.stored(tokens[:pos], leaf.key)
                return present
            common = self._common_pages(child.key, tokens[:usable], pos)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            pos += len(child.key)
            node = child
        return pos

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction while a request uses them."""
        while node is not self.root and node is not None:
            if node.lock_ref == 0:
                self.locked_blocks += len(node.blocks)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`."""
        while node is not self.root and node is not None:
            if node.lock_ref <= 0:
                raise ValueError("unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked_blocks -= len(node.blocks)
                self._offer(node)
            node = node.parent

    def evict(self, num_blocks: int) -> int:
        """Free at least `num_blocks` blocks if possible, LRU unlocked leaves first; returns blocks evicted."""
        evicted = 0
        while evicted < num_blocks and self._heap:
            key, _, leaf = heapq.heappop(self._heap)
            if leaf.children or leaf.lock_ref:
                leaf.heap_entry = -1  # pushed again once it is an unlocked leaf
                continue
            if key != leaf.last_access:  # touched since it was pushed: back under its true time
                leaf.heap_entry = seq = next(self._seq)
                heapq.heappush(self._heap, (leaf.last_access, seq, leaf))
                continue
            leaf.heap_entry = _EVICTED
            parent = leaf.parent
            del parent.children[leaf.key[:self.page_size]]
            if self.events is not None:
                self.events.removed(self._path(parent), leaf.key)
            self.pool.release(leaf.blocks)
            self.cached_blocks -= len(leaf.blocks)
            evicted += len(leaf.blocks)
            self._offer(parent)
        return evicted

    def reset(self) -> None:
        """Evict everything (all nodes must be unlocked)."""
        if self.locked_blocks:
            raise ValueError("cannot reset the prefix cache while requests hold locked nodes")
        self.evict(self.cached_blocks)
        if self.events is not None:
            self.events.cleared()

    # --- internals -----------------------------------------------------------------
    def _common_pages(self, key: tuple[int, ...], tokens: Sequence[int], pos: int) -> int:
        """Length (in tokens, whole pages) of the common prefix of `key` and tokens[pos:]."""
        page, n = self.page_size, 0
        limit = min(len(key), len(tokens) - pos)
        while n + page <= limit and tuple(tokens[pos + n:pos + n + page]) == key[n:n + page]:
            n += page
        return n

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut `child` after `at` tokens; returns the new upper node."""
        page = self.page_size
        upper = RadixNode(key=child.key[:at], blocks=child.blocks[:at // page], parent=child.parent,
                          lock_ref=child.lock_ref, last_access=child.last_access)
        upper.parent.children[upper.key[:page]] = upper
        child.key, child.blocks, child.parent = child.key[at:], child.blocks[at // page:], upper
        upper.children[child.key[:page]] = child
        return upper

    def _path(self, node: RadixNode) -> list[int]:
        """The token ids from the root down to the end of `node`."""
        keys = []
        while node is not None and node is not self.root:
            keys.append(node.key)
            node = node.parent
        return [t for key in reversed(keys) for t in key]

    def _offer(self, node: RadixNode) -> None:
        """Give `node` an eviction-heap entry if it is an unlocked leaf without one."""
        if node.heap_entry == -1 and not node.children and not node.lock_ref and node is not self.root:
            node.heap_entry = seq = next(self._seq)
            heapq.heappush(self._heap, (node.last_access, seq, node))

    def check_integrity(self) -> None:
        """Raise AssertionError when an invariant of the module docstring does not hold."""
        page, cached, locked, stack = self.page_size, 0, 0, [self.root]
        entries = {seq: (key, node) for key, seq, node in self._heap}
        assert len(entries) == len(self._heap), "two heap entries share a sequence number"
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                assert child.parent is node, "child's parent pointer is wrong"
                assert child.key and len(child.key) % page == 0, "key is not whole pages"
                assert len(child.key) == len(child.blocks) * page, "key and blocks disagree"
                assert first == child.key[:page], "child filed under the wrong first page"
                assert child.lock_ref >= sum(c.lock_ref for c in child.children.values()), "lock_ref below children's"
                for b in child.blocks:
                    assert self.pool.refcount(b) >= 1, f"cached block {b} is free"
                assert child.last_access <= node.last_access or node is self.root, "child newer than parent"
                if child.heap_entry >= 0:
                    key, entry_node = entries.pop(child.heap_entry, (None, None))
                    assert entry_node is child, "node's heap entry is missing"
                    assert key <= child.last_access, "heap key above the node's last access"
                else:
                    assert child.children or child.lock_ref, "unlocked leaf without a heap entry"
                cached += len(child.blocks)
                locked += len(child.blocks) if child.lock_ref > 0 else 0
                stack.append(child)
        assert cached == self.cached_blocks, f"cached_blocks {self.cached_blocks} != {cached}"
        assert locked == self.locked_blocks, f"locked_blocks {self.locked_blocks} != {locked}"
        assert not entries, "heap entries of nodes not in the tree, or not theirs"

"""A bounded, approximate prefix tree over token ids: what the router believes one worker
holds in its prefix cache (the prompts recently routed there). Used by cache_aware.

Shape: a trie whose edges are *chunks* of ``chunk_size`` consecutive token ids (the last
chunk of a prompt may be shorter). One dict lookup covers ``chunk_size`` tokens, which
keeps matching cheap in Python; the price is approximation: a match advances only over
whole equal chunks, so it undercounts by less than ``chunk_size`` tokens (a prompt that
diverges mid-chunk, or a stored short last chunk that a longer prompt extends, stops the
match at the chunk boundary before it). It never overcounts.

Size: the number of token ids held in the nodes (each node holds its chunk). ``insert``
stores at most the first ``max_tokens`` tokens of a prompt and then evicts until
``size <= max_tokens``.

Eviction (LRU over leaves): every ``insert`` stamps all nodes on its path with a fresh
tick of a counter, so a parent is never older than its children and the oldest leaf holds
the suffix of the least recently routed prompt. Eviction removes oldest leaves first;
a parent left without children becomes a leaf in turn. Leaves wait in a lazy min-heap of
(stamp, seq, node); an entry whose node was restamped, gained a child or was evicted is
stale and skipped when popped, and the heap is rebuilt when it outgrows the tree.
``match`` is pure: only routing (``insert``) refreshes recency.

Invariants (checked by ``check_integrity``): size == total tokens in non-root nodes
<= max_tokens after every insert; every leaf has a live heap entry.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Iterator, Optional, Sequence


class _Node:
    __slots__ = ("key", "parent", "children", "stamp")

    def __init__(self, key: tuple[int, ...], parent: Optional["_Node"], stamp: int) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.stamp = stamp


class PrefixTree:
    """Chunked token trie with a token budget and LRU leaf eviction."""

    def __init__(self, max_tokens: int, chunk_size: int = 16) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.max_tokens = max_tokens
        self.chunk_size = chunk_size
        self._root = _Node((), None, 0)
        self._size = 0
        self._nodes = 0
        self._tick = 0
        self._seq = itertools.count()
        self._leaves: list[tuple[int, int, _Node]] = []

    @property
    def size(self) -> int:
        """Token ids currently held."""
        return self._size

    def match(self, tokens: Sequence[int]) -> int:
        """Length of the longest stored prefix of ``tokens``, in whole chunks (pure)."""
        node, matched = self._root, 0
        for key in self._chunks(tokens):
            node = node.children.get(key)
            if node is None:
                break
            matched += len(key)
        return matched

    def insert(self, tokens: Sequence[int]) -> None:
        """Store ``tokens[:max_tokens]`` as most recently used, then evict to the budget."""
        self._tick += 1
        node = self._root
        for key in self._chunks(tokens[: self.max_tokens]):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(key, node, self._tick)
                self._size += len(key)
                self._nodes += 1
            child.stamp = self._tick
            node = child
        if node is not self._root and not node.children:
            self._push(node)
        self._evict()
        if len(self._leaves) > 2 * self._nodes + 64:
            self._rebuild_heap()

    def check_integrity(self) -> None:
        """Raise AssertionError when an invariant of the module docstring is broken."""
        total, live = 0, {id(n) for s, _, n in self._leaves if self._is_live(s, n)}
        for node in self._walk():
            total += len(node.key)
            assert node.parent is self._root or node.stamp <= node.parent.stamp, "child newer than parent"
            assert node.children or id(node) in live, "leaf without a heap entry"
        assert total == self._size <= self.max_tokens, (total, self._size, self.max_tokens)

    def _chunks(self, tokens: Sequence[int]) -> Iterator[tuple[int, ...]]:
        step = self.chunk_size
        for start in range(0, len(tokens), step):
            yield tuple(tokens[start:start + step])

    def _push(self, node: _Node) -> None:
        heapq.heappush(self._leaves, (node.stamp, next(self._seq), node))

    @staticmethod
    def _is_live(stamp: int, node: _Node) -> bool:
        return node.parent is not None and not node.children and node.stamp == stamp

    def _evict(self) -> None:
        while self._size > self.max_tokens:
            stamp, _, node = heapq.heappop(self._leaves)
            if not self._is_live(stamp, node):
                continue
            parent = node.parent
            del parent.children[node.key]
            node.parent = None
            self._size -= len(node.key)
            self._nodes -= 1
            if parent is not self._root and not parent.children:
                self._push(parent)

    def _walk(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _rebuild_heap(self) -> None:
        self._leaves = [(n.stamp, next(self._seq), n) for n in self._walk() if not n.children]
        heapq.heapify(self._leaves)

"""Chain hashes of KV blocks: the names workers and the router give the same cached block.

A block is one page of `block_size` token ids. Its hash covers its own tokens and the hash
of the block before it (the first block's parent is `ROOT_HASH`), so equal hashes mean equal
prefixes, and a prompt's cached blocks are found by hashing the prompt page by page.
Workers publish these hashes in KV events (`baton.v1.KVEvents`); the router's index
(router/kv_index.py) looks prompts up with the same function.

Python's `hash` of a tuple of ints is not salted (PYTHONHASHSEED covers str and bytes only)
and has been the same algorithm since Python 3.8, so every process of a cluster, on 3.11 or
3.12, computes the same values; the result is folded to an unsigned 64-bit number (the wire
type) and never 0 (0 means "no parent" on the wire).
"""
from __future__ import annotations

from typing import Sequence

ROOT_HASH = 0
"""The parent of a sequence's first block."""
_MASK = (1 << 64) - 1


def next_block_hash(parent: int, page: Sequence[int]) -> int:
    """The hash of a block holding `page` (one page of token ids) after the block `parent`."""
    return (hash((parent, tuple(page))) & _MASK) or 1


def block_hashes(tokens: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """The chain hashes of every whole page of `tokens` (a trailing partial page has none),
    starting after the block `parent`."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes, h = [], parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = next_block_hash(h, tokens[start:start + block_size])
        hashes.append(h)
    return hashes

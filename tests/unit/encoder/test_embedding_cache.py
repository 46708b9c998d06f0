"""The encoder's embedding cache over a transfer arena: round trips, LRU bounded in bytes, pins,
hit rate; and the tcp hand-off of cached blocks into a worker's landing arena (real zmq)."""
from __future__ import annotations

import pytest
import torch

from baton.services.encoder.embedding_cache import EmbeddingCache
from baton.services.transfer.base import TransferState
from baton.services.transfer.factory import create_transfer_engine
from baton.services.worker.embedding_memory import ArenaFull, EmbeddingArena


def embeddings(seed: int, n: int, hidden: int = 8) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def test_arena_round_trip_and_free_list():
    arena = EmbeddingArena(num_blocks=4, hidden_size=8, dtype=torch.float32, tokens_per_block=3)
    blocks = arena.allocate(7)
    assert len(blocks) == 3 and arena.num_free == 1
    values = embeddings(0, 7)
    arena.store(blocks, values)
    assert torch.equal(arena.load(blocks, 7), values)
    with pytest.raises(ArenaFull):
        arena.allocate(4)
    arena.free(blocks)
    assert arena.num_free == 4 and arena.block_bytes == 3 * 8 * 4


def test_lru_bounded_in_bytes_keeps_pinned_entries_and_counts_hits():
    arena = EmbeddingArena.with_bytes(4 * 2 * 8 * 4, hidden_size=8, dtype=torch.float32, tokens_per_block=2)
    cache = EmbeddingCache(arena)  # 4 blocks of 2 embeddings
    first = cache.insert("a" * 64, embeddings(1, 4), ())  # 2 blocks, pinned
    cache.unpin(first)
    second = cache.insert("b" * 64, embeddings(2, 4), ())  # 2 blocks, stays pinned
    assert cache.lookup("a" * 64) is first and cache.hit_rate == 1.0  # a is now the most recent
    cache.unpin(first)
    third = cache.insert("c" * 64, embeddings(3, 3), ())  # evicts a (b is pinned)
    assert cache.lookup("a" * 64) is None and cache.lookup("b" * 64) is second
    assert torch.equal(arena.load(third.blocks, 3), embeddings(3, 3))
    assert cache.evictions == 1 and cache.used_bytes == 4 * arena.block_bytes
    with pytest.raises(ArenaFull):  # b and c pinned: nothing to evict
        cache.insert("d" * 64, embeddings(4, 2), ())
    assert (cache.hits, cache.misses) == (2, 1)


def test_cached_blocks_reach_a_landing_arena_over_tcp():
    source = EmbeddingArena(num_blocks=8, hidden_size=8, dtype=torch.float32, tokens_per_block=4)
    landing = EmbeddingArena(num_blocks=6, hidden_size=8, dtype=torch.float32, tokens_per_block=4)
    cache = EmbeddingCache(source)
    entry = cache.insert("e" * 64, embeddings(5, 6), ())
    sender = create_transfer_engine("tcp", "encoder/images", source.memory)
    receiver = create_transfer_engine("tcp", "worker/images", landing.memory)
    try:
        sender.connect(receiver.descriptor())
        dst = landing.allocate(6)
        handle = sender.write("worker/images", "req-1/images", list(zip(entry.blocks, dst)), timeout=5)
        assert handle.ok and receiver.wait_received("req-1/images", 5) is TransferState.SUCCESS
        assert torch.equal(landing.load(dst, 6), embeddings(5, 6))
        wider = EmbeddingArena(num_blocks=2, hidden_size=16, dtype=torch.float32, tokens_per_block=4)
        other = create_transfer_engine("tcp", "wide/images", wider.memory)
        with pytest.raises(Exception, match="head_dim"):  # a model of another width is refused at handshake
            sender.connect(other.descriptor())
        other.close()
    finally:
        sender.close()
        receiver.close()

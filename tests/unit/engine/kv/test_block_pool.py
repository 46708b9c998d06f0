"""BlockPool: exact block ids, reference counting, and integrity."""
import pytest

from baton.services.engine.kv.block_pool import BlockPool, OutOfBlocks


def test_allocates_in_fifo_order_and_reuses_freed_blocks_last():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.release([0])
    assert pool.allocate(2) == [3, 0]
    assert pool.num_free == 0
    pool.check_integrity()


def test_shared_block_is_freed_only_by_its_last_holder():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.share([b])
    assert pool.refcount(b) == 2
    pool.release([b])
    assert pool.num_free == 1 and pool.refcount(b) == 1
    pool.release([b])
    assert pool.num_free == 2 and pool.refcount(b) == 0
    pool.check_integrity()


def test_errors_on_overallocation_double_release_and_sharing_free_blocks():
    pool = BlockPool(2)
    with pytest.raises(OutOfBlocks):
        pool.allocate(3)
    assert not pool.can_allocate(3) and pool.can_allocate(2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(ValueError):
        pool.release(blocks)
    with pytest.raises(ValueError):
        pool.share([1])
    pool.check_integrity()
    assert pool.num_free == 2

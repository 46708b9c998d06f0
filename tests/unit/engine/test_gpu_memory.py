"""The KV pool's size from this process's own share of the GPU (pure arithmetic, on CPU):
what is left after weights, step workspace and graphs; two processes at 0.42 on one GPU both
fit whatever the other holds; clear errors when the share cannot hold the weights, leaves
nothing for the pool, or promises memory that is not free."""
import pytest

from baton.services.engine.gpu_memory import (GIB, SLACK_BYTES, StepProfile, check_share_holds, graph_reserve_bytes,
                                              kv_pool_bytes)

TOTAL = 140 * GIB
WEIGHTS = 16 * GIB
ACTIVATION = 3 * GIB


def test_the_pool_is_the_share_minus_what_this_process_needs():
    kv = kv_pool_bytes(TOTAL, 0.85, WEIGHTS, ACTIVATION, graphs=GIB // 2)
    assert kv == int(TOTAL * 0.85) - WEIGHTS - ACTIVATION - GIB // 2 - SLACK_BYTES


def test_it_does_not_depend_on_what_other_processes_hold():
    alone = kv_pool_bytes(TOTAL, 0.42, WEIGHTS, ACTIVATION, free=TOTAL - WEIGHTS)
    # the other worker already holds its whole share: the same pool, as long as it is free
    other = int(TOTAL * 0.42)
    shared = kv_pool_bytes(TOTAL, 0.42, WEIGHTS, ACTIVATION, free=TOTAL - other - WEIGHTS - GIB)
    assert alone == shared > 0


def test_two_workers_at_042_fit_on_one_gpu_in_either_order():
    context = GIB // 2  # each process's CUDA context, outside the shares
    used = 2 * context
    for _ in range(2):  # each starts once the other holds its weights and pool
        held = WEIGHTS
        free = TOTAL - used - held
        kv = kv_pool_bytes(TOTAL, 0.42, held, ACTIVATION, free=free)
        used += held + kv + ACTIVATION
    assert used <= TOTAL


def test_a_share_too_small_for_the_weights_is_refused_clearly():
    with pytest.raises(ValueError, match="weights.*raise --mem-fraction-static"):
        check_share_holds(TOTAL, 0.1, WEIGHTS)
    with pytest.raises(ValueError, match="weights"):
        kv_pool_bytes(TOTAL, 0.1, WEIGHTS, ACTIVATION)
    check_share_holds(TOTAL, 0.2, WEIGHTS)


def test_no_room_for_the_pool_and_memory_that_is_not_free():
    with pytest.raises(ValueError, match="nothing for the KV cache"):
        kv_pool_bytes(TOTAL, 0.14, WEIGHTS, 4 * GIB)
    with pytest.raises(ValueError, match="free on the GPU"):
        kv_pool_bytes(TOTAL, 0.85, WEIGHTS, ACTIVATION, free=40 * GIB)


def test_graph_reserve_counts_logits_inputs_and_scaled_decode_activations():
    assert graph_reserve_bytes(0, 1000, 2, 8, None) == 0
    static = 512 * 128256 * 2 + 4 * 512 * (5 + 8192)
    assert graph_reserve_bytes(512, 128256, 2, 8192, None) == static
    profile = StepProfile(activation_bytes=4 * GIB, decode_forward_bytes=GIB, decode_rows=1024)
    assert graph_reserve_bytes(512, 128256, 2, 8192, profile) == static + GIB // 2

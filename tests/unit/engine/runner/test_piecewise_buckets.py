"""The token counts piecewise CUDA graphs are captured for (the capture itself needs a GPU:
tests/gpu/test_piecewise_graph.py): fine steps for small counts, none below 16, the maximum
itself always included, and a step padded to at most a third more than its tokens past 64."""
import bisect

from baton.services.engine.runner.piecewise_graph import piecewise_buckets


def test_buckets_up_to_512():
    assert piecewise_buckets(512) == [16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


def test_the_maximum_is_always_a_bucket_and_nothing_below_16():
    assert piecewise_buckets(100) == [16, 32, 48, 64, 96, 100]
    assert piecewise_buckets(8) == []
    assert piecewise_buckets(16) == [16]


def test_padding_stays_small():
    buckets = piecewise_buckets(512)
    for tokens in range(65, 513):
        padded = buckets[bisect.bisect_left(buckets, tokens)]
        assert padded - tokens < max(32, tokens // 3), tokens

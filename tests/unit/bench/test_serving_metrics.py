"""bench.serving.metrics on hand-made timelines whose figures are known exactly."""
from __future__ import annotations

import pytest

from baton.bench.serving.metrics import RequestRecord, cdf, meets_slos, stats_ms, summarize, throughput_over_time


def rec(start, chunks, end, out, prompt=10, cached=None, **kw):
    return RequestRecord(start=start, chunk_times=list(chunks), end=end, output_tokens=out, prompt_tokens=prompt,
                         cached_tokens=cached, success=True, prompt_tokens_from_usage=True,
                         output_tokens_from_usage=True, **kw)


def failed(start, end, kind):
    return RequestRecord(start=start, end=end, success=False, error_kind=kind, error=f"{kind} happened")


def test_per_request_definitions():
    r = rec(1.0, [1.5, 1.6, 1.8, 2.1], 2.2, out=5)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.2)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.tpot == pytest.approx((1.2 - 0.5) / 4)  # (E2E - TTFT) / (output tokens - 1)
    one = rec(0.0, [0.3], 0.4, out=1)
    assert one.tpot is None and one.itls == []
    assert RequestRecord(start=0.0, end=1.0).ttft is None


def test_stats_ms_known_values():
    s = stats_ms([0.001, 0.002, 0.003, 0.004])
    assert s["mean"] == pytest.approx(2.5) and s["median"] == pytest.approx(2.5)
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)  # linear interpolation, as numpy / vLLM
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(4.0)
    assert stats_ms([]) == {k: None for k in ("mean", "median", "p90", "p99", "min", "max")}


def test_summary_of_a_small_run():
    records = [rec(0.0, [0.2, 0.3, 0.4], 0.4, out=3, prompt=100, cached=40),    # ttft 200, tpot 100, e2e 400
               rec(0.5, [1.5, 1.6], 1.7, out=2, prompt=50, cached=0),           # ttft 1000, tpot 200, e2e 1200
               rec(1.0, [1.1, 1.2, 1.3, 1.4, 1.5], 2.0, out=10, prompt=30),     # ttft 100, tpot 100, e2e 1000
               failed(1.0, 1.2, "http_500"), failed(1.5, 1.6, "http_500"), failed(1.9, 1.9, "timeout")]
    s = summarize(records, {"ttft": 500.0, "tpot": 150.0})
    assert s["duration_s"] == pytest.approx(2.0)  # first start 0.0 to last end 2.0
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 3, 3)
    assert s["errors"] == {"http_500": 2, "timeout": 1}
    assert s["error_examples"]["timeout"] == "timeout happened"
    assert s["total_input_tokens"] == 180 and s["total_output_tokens"] == 15
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["input_throughput"] == pytest.approx(90.0) and s["output_throughput"] == pytest.approx(7.5)
    assert s["total_token_throughput"] == pytest.approx(97.5)
    assert s["good_requests"] == 2 and s["goodput"] == pytest.approx(1.0)  # the second misses both SLOs
    assert s["ttft_ms"]["mean"] == pytest.approx((200 + 1000 + 100) / 3)
    assert s["ttft_ms"]["median"] == pytest.approx(200)
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 200 + 100) / 3)  # third: (1000 - 100) / 9
    assert s["e2e_ms"]["max"] == pytest.approx(1200)
    assert s["itl_ms"]["mean"] == pytest.approx(100)  # every gap is 0.1 s
    assert s["cached_tokens"] == 40 and s["prefix_cache_hit_rate"] == pytest.approx(40 / 150)
    assert s["input_tokens_counted_by"] == "usage"


def test_goodput_without_slos_counts_every_success_and_never_exceeds_throughput():
    records = [rec(0, [0.1], 1.0, out=1), failed(0, 0.5, "connection_error")]
    s = summarize(records)
    assert s["goodput"] == s["request_throughput"] == pytest.approx(1.0)
    strict = summarize(records, {"e2e": 10.0})
    assert strict["good_requests"] == 0 and strict["goodput"] == 0.0


def test_slo_checks():
    r = rec(0.0, [0.2, 0.3], 0.3, out=2)  # ttft 200, tpot 100, e2e 300
    assert meets_slos(r, {"ttft": 200, "tpot": 100, "e2e": 300})
    assert not meets_slos(r, {"tpot": 99})
    assert meets_slos(rec(0.0, [0.2], 0.2, out=1), {"tpot": 1})  # no TPOT with one token
    assert not meets_slos(failed(0, 0.1, "x"), {})


def test_all_failed_and_empty_runs_do_not_divide_by_zero():
    s = summarize([failed(0.0, 0.0, "connection_error")] * 3)
    assert s["completed"] == 0 and s["errors"] == {"connection_error": 3}
    assert s["request_throughput"] == 0.0 and s["ttft_ms"]["mean"] is None
    assert summarize([])["duration_s"] == 0.0
    assert s["input_tokens_counted_by"] == "none" and s["prefix_cache_hit_rate"] is None


def test_token_source_reports_estimates():
    r = rec(0, [0.1], 0.2, out=1)
    r.prompt_tokens_from_usage = False
    assert summarize([r])["input_tokens_counted_by"] == "estimate"
    assert summarize([r, rec(0, [0.1], 0.2, out=1)])["input_tokens_counted_by"] == "mixed"


def test_throughput_over_time_bins():
    records = [rec(0.0, [0.5, 1.5], 1.5, out=4), rec(0.2, [2.5], 2.6, out=1)]
    series = throughput_over_time(records, bin_s=1.0)
    assert series["t"] == [0.0, 1.0, 2.0]
    assert series["output_tokens_per_s"] == pytest.approx([2.0, 2.0, 1.0])
    assert series["requests_per_s"] == pytest.approx([0.0, 1.0, 1.0])
    assert sum(series["output_tokens_per_s"]) * 1.0 == pytest.approx(5)
    assert series["in_flight"] == pytest.approx([2, 2, 1])
    assert throughput_over_time([])["t"] == []


def test_cdf():
    xs, ys = cdf([3.0, 1.0, 2.0])
    assert xs == [1.0, 2.0, 3.0] and ys == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_itl_is_per_token_when_chunks_and_reads_carry_several_tokens():
    # chunk 0 alone (TTFT); a 3-token chunk after 0.3 s; two chunks (1 + 2 tokens) in one read after 0.6 s;
    # a chunk that usage says carried 0 tokens (its gap rolls into the next); a 2-token chunk 0.2 s after the last.
    r = rec(0.0, [0.1, 0.4, 1.0, 1.0, 1.1, 1.2], 1.2, out=9, chunk_tokens=[1, 3, 1, 2, 0, 2],
            chunk_reads=[1, 2, 3, 3, 4, 5], tokens_counted_by="usage")
    assert r.arrivals == [(0.1, 1, 1), (0.4, 3, 1), (1.0, 3, 2), (1.1, 0, 1), (1.2, 2, 1)]
    assert r.itls == pytest.approx([0.1] * 3 + [0.2] * 3 + [0.1] * 2)
    assert sum(r.itls) == pytest.approx(1.2 - 0.1)  # the gaps add up to last arrival - first arrival
    assert r.tpot == pytest.approx((1.2 - 0.1) / 8)
    s = summarize([r])
    assert s["itl_ms"]["median"] == pytest.approx(100.0) and s["itl_ms"]["mean"] == pytest.approx(1100 / 8)
    c = s["coalescing"]
    assert c["tokens_counted_by"] == "usage" and c["chunks"] == 6 and c["tokens_per_chunk_mean"] == pytest.approx(1.5)
    assert c["multi_token_chunks"] == 3 and c["multi_token_chunk_fraction"] == pytest.approx(0.5)
    assert c["reads"] == 5 and c["multi_chunk_reads"] == 1 and c["multi_chunk_read_fraction"] == pytest.approx(0.2)


def test_near_zero_gaps_of_one_read_are_spread_not_counted():
    # Two chunks per read, 1 token each, reads 40 ms apart: the old per-chunk median was ~0 ms.
    times = [0.04 * (i // 2) + (i % 2) * 1e-6 for i in range(8)]
    r = rec(0.0, times, times[-1], out=8, chunk_reads=[i // 2 for i in range(8)])
    assert r.itls == pytest.approx([0.02] * 6, abs=1e-6)
    assert summarize([r])["itl_ms"]["median"] == pytest.approx(20.0, abs=1e-3)
    c = summarize([r])["coalescing"]
    assert c["tokens_counted_by"] == "events" and c["multi_token_chunk_fraction"] is None  # 1 per chunk: not counted
    assert c["multi_chunk_read_fraction"] == pytest.approx(1.0)
    unobserved = rec(0.0, times, times[-1], out=8)  # reads unknown: each chunk is its own arrival
    assert len(unobserved.itls) == 7 and summarize([unobserved])["coalescing"]["reads"] is None


def test_first_arrival_extra_tokens_and_usage_totals():
    from baton.bench.serving.metrics import usage_chunk_tokens
    r = rec(0.0, [0.5, 0.7], 0.7, out=4, chunk_tokens=[2, 2], tokens_counted_by="usage")
    assert r.itls == pytest.approx([0.1, 0.1])  # the first chunk's second token gives no gap
    assert usage_chunk_tokens([1, 3, 3, 6]) == [1, 2, 0, 3]
    assert usage_chunk_tokens([1, None, 2]) is None and usage_chunk_tokens([]) is None


def test_throughput_over_time_spreads_by_chunk_tokens():
    r = rec(0.0, [0.5, 1.5], 1.5, out=4, chunk_tokens=[1, 3], tokens_counted_by="tokenizer")
    assert throughput_over_time([r], bin_s=1.0)["output_tokens_per_s"] == pytest.approx([1.0, 3.0])

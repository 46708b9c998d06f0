"""Per-request timelines and the figures computed from them (pure functions, no I/O).

Definitions follow SGLang's `bench_serving` and vLLM's `bench serve`:
- TTFT: request start to the first chunk with non-empty text.
- ITL: the gaps between consecutive non-empty chunks (a chunk may carry several tokens).
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
- E2E: request start to the end of the stream.
- Throughputs divide the totals of successful requests by the run's duration (first send
  to last completion); goodput counts only the requests that meet every SLO given (with
  no SLO every successful request counts, so goodput equals the request throughput).
Times are seconds on the run's clock; reported latencies are milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

STAT_KEYS = ("mean", "median", "p90", "p99", "min", "max")


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    session: int = 0
    turn: int = 0
    start: float = 0.0
    """Seconds since the run started when the request was sent."""
    chunk_times: list[float] = field(default_factory=list)
    """Arrival time of every chunk with non-empty text (same clock as start)."""
    end: float = 0.0
    """When the stream ended (or the error arrived)."""
    prompt_tokens: int = 0
    prompt_tokens_from_usage: bool = False
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    cached_tokens: Optional[int] = None
    """usage.prompt_tokens_details.cached_tokens when the server reports it."""
    max_tokens: int = 0
    success: bool = False
    error_kind: str = ""
    """e.g. http_404, connection_error, timeout, stream_error, empty_output."""
    error: str = ""
    text: str = ""

    @property
    def ttft(self) -> Optional[float]:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def stats_ms(values_s: Iterable[float]) -> dict[str, Optional[float]]:
    """mean / median / p90 / p99 / min / max in milliseconds (None for each when empty)."""
    values = np.asarray(list(values_s), dtype=float) * 1000.0
    if values.size == 0:
        return {k: None for k in STAT_KEYS}
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
            "min": float(values.min()), "max": float(values.max())}


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO (TPOT is met trivially with < 2 tokens)."""
    if not record.success:
        return False
    checks = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    for key, limit in slos_ms.items():
        value = checks[key]
        if value is not None and value * 1000.0 > limit:
            return False
        if value is None and key == "ttft":
            return False
    return True


def run_duration(records: Sequence[RequestRecord]) -> float:
    """First send to last completion, in seconds (0 with no records)."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def errors_by_kind(records: Sequence[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            counts[r.error_kind or "unknown"] = counts.get(r.error_kind or "unknown", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(records: Sequence[RequestRecord], slos_ms: Optional[dict[str, float]] = None,
              duration: Optional[float] = None) -> dict:
    """Every client-side figure of a run (see the module doc for the definitions)."""
    slos_ms = slos_ms or {}
    duration = run_duration(records) if duration is None else duration
    ok = [r for r in records if r.success]
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if meets_slos(r, slos_ms))
    cached = [r for r in ok if r.cached_tokens is not None]
    cached_tokens = sum(r.cached_tokens or 0 for r in cached)
    cached_prompt_tokens = sum(r.prompt_tokens for r in cached)
    failed = [r for r in records if not r.success]
    return {
        "num_requests": len(records), "completed": len(ok), "failed": len(failed),
        "errors": errors_by_kind(records),
        "error_examples": {r.error_kind: r.error[:300] for r in reversed(failed)},
        "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "input_tokens_counted_by": _source([r.prompt_tokens_from_usage for r in ok]),
        "output_tokens_counted_by": _source([r.output_tokens_from_usage for r in ok]),
        "request_throughput": per_s(len(ok)), "input_throughput": per_s(input_tokens),
        "output_throughput": per_s(output_tokens), "total_token_throughput": per_s(input_tokens + output_tokens),
        "slo_ms": dict(slos_ms), "good_requests": good, "goodput": per_s(good),
        "ttft_ms": stats_ms(r.ttft for r in ok if r.ttft is not None),
        "tpot_ms": stats_ms(r.tpot for r in ok if r.tpot is not None),
        "itl_ms": stats_ms(x for r in ok for x in r.itls),
        "e2e_ms": stats_ms(r.e2e for r in ok),
        "cached_tokens": cached_tokens if cached else None,
        "prefix_cache_hit_rate": (cached_tokens / cached_prompt_tokens) if cached and cached_prompt_tokens else None,
    }


def _source(flags: list[bool]) -> str:
    if not flags:
        return "none"
    return "usage" if all(flags) else ("estimate" if not any(flags) else "mixed")


def throughput_over_time(records: Sequence[RequestRecord], bin_s: float = 1.0) -> dict:
    """Output tokens/s (spread over each request's chunks) and completions/s, per time bin."""
    if not records:
        return {"bin_s": bin_s, "t": [], "output_tokens_per_s": [], "requests_per_s": [], "in_flight": []}
    t0 = min(r.start for r in records)
    bins = max(1, math.ceil((max(r.end for r in records) - t0) / bin_s + 1e-9))
    tokens, done, in_flight = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    index = lambda t: min(bins - 1, max(0, int((t - t0) / bin_s)))  # noqa: E731
    for r in records:
        if r.success and r.chunk_times:
            share = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                tokens[index(t)] += share
            done[index(r.end)] += 1
        in_flight[index(r.start):index(r.end) + 1] += 1
    return {"bin_s": bin_s, "t": [round(i * bin_s, 6) for i in range(bins)],
            "output_tokens_per_s": (tokens / bin_s).tolist(), "requests_per_s": (done / bin_s).tolist(),
            "in_flight": in_flight.tolist()}


def cdf(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their empirical cumulative fractions (for a CDF plot)."""
    xs = sorted(values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]

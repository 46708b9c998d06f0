"""Per-request timelines and the figures computed from them (pure functions, no I/O).

Definitions follow SGLang's `bench_serving` and vLLM's `bench serve`:
- TTFT: request start to the first chunk with non-empty text.
- ITL, per token (as SGLang's `bench_serving` does with the server's token counts): the
  chunks of one network read form one arrival; an arrival carrying k tokens after a gap g
  gives k gaps of g / k (an arrival of 0 tokens rolls its gap into the next one; the first
  arrival's extra tokens give none, TTFT covers them). A chunk's tokens come from the
  server's per-chunk usage (continuous_usage_stats), else the tokenizer, else 1 per chunk.
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
- E2E: request start to the end of the stream.
- Throughputs divide the totals of successful requests by the run's duration (first send
  to last completion); goodput counts only the requests that meet every SLO given (with
  no SLO every successful request counts, so goodput equals the request throughput).
- Coalescing: the fraction of text chunks (SSE events) that carried more than one token,
  and of network reads that delivered more than one text chunk.
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
    """Arrival time of every chunk with non-empty text (same clock as start; its network read's time)."""
    chunk_texts: list[str] = field(default_factory=list)
    """The text of each of those chunks."""
    chunk_usage: list[Optional[int]] = field(default_factory=list)
    """usage.completion_tokens sent with each of those chunks (running total), None where absent."""
    chunk_reads: list[int] = field(default_factory=list)
    """The network read each of those chunks came in (empty: reads not observed, one read per chunk)."""
    chunk_tokens: list[int] = field(default_factory=list)
    """Tokens each of those chunks carried (empty: 1 each)."""
    tokens_counted_by: str = "events"
    """How chunk_tokens were counted: usage, tokenizer or events (1 per chunk)."""
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
    def token_counts(self) -> list[int]:
        """Tokens per chunk: chunk_tokens when counted, else 1 each."""
        if len(self.chunk_tokens) == len(self.chunk_times):
            return list(self.chunk_tokens)
        return [1] * len(self.chunk_times)

    @property
    def arrivals(self) -> list[tuple[float, int, int]]:
        """(time, tokens, chunks) of each network read that brought text (a chunk alone when reads are unknown)."""
        reads = self.chunk_reads if len(self.chunk_reads) == len(self.chunk_times) else range(len(self.chunk_times))
        out: list[tuple[float, int, int]] = []
        previous = None
        for t, k, read in zip(self.chunk_times, self.token_counts, reads):
            if out and read == previous:
                out[-1] = (out[-1][0], out[-1][1] + k, out[-1][2] + 1)
            else:
                out.append((t, k, 1))
            previous = read
        return out

    @property
    def itls(self) -> list[float]:
        """Per-token inter-token latencies (see the module doc)."""
        arrivals = self.arrivals
        gaps: list[float] = []
        if not arrivals:
            return gaps
        last = arrivals[0][0]
        for t, k, _ in arrivals[1:]:
            if k <= 0:
                continue
            gaps.extend([(t - last) / k] * k)
            last = t
        return gaps

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


def usage_chunk_tokens(chunk_usage: Sequence[Optional[int]]) -> Optional[list[int]]:
    """Tokens per chunk from the running usage totals sent with every chunk; None unless all have one."""
    if not chunk_usage or any(u is None for u in chunk_usage):
        return None
    counts, previous = [], 0
    for total in chunk_usage:
        counts.append(max(0, int(total) - previous))  # type: ignore[arg-type]
        previous = max(previous, int(total))  # type: ignore[arg-type]
    return counts


def coalescing(records: Sequence[RequestRecord]) -> dict:
    """How often chunks carried several tokens and reads several chunks (successful requests)."""
    ok = [r for r in records if r.success and r.chunk_times]
    counted = [r for r in ok if r.tokens_counted_by != "events"]
    chunks = sum(len(r.chunk_times) for r in counted)
    multi_token = sum(1 for r in counted for k in r.token_counts if k > 1)
    observed = [r for r in ok if len(r.chunk_reads) == len(r.chunk_times)]
    reads = [a for r in observed for a in r.arrivals]
    multi_chunk = sum(1 for a in reads if a[2] > 1)
    return {"tokens_counted_by": _counted_by([r.tokens_counted_by for r in ok]),
            "chunks": sum(len(r.chunk_times) for r in ok),
            "tokens_per_chunk_mean": (sum(sum(r.token_counts) for r in counted) / chunks) if chunks else None,
            "multi_token_chunks": multi_token if counted else None,
            "multi_token_chunk_fraction": (multi_token / chunks) if chunks else None,
            "reads": len(reads) if observed else None,
            "multi_chunk_reads": multi_chunk if observed else None,
            "multi_chunk_read_fraction": (multi_chunk / len(reads)) if reads else None}


def _counted_by(kinds: list[str]) -> str:
    if not kinds:
        return "none"
    return kinds[0] if len(set(kinds)) == 1 else "mixed"


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
        "coalescing": coalescing(records),
        "cached_tokens": cached_tokens if cached else None,
        "prefix_cache_hit_rate": (cached_tokens / cached_prompt_tokens) if cached and cached_prompt_tokens else None,
    }


def _source(flags: list[bool]) -> str:
    if not flags:
        return "none"
    return "usage" if all(flags) else ("estimate" if not any(flags) else "mixed")


def throughput_over_time(records: Sequence[RequestRecord], bin_s: float = 1.0) -> dict:
    """Output tokens/s (spread over each request's chunks by their tokens) and completions/s, per time bin."""
    if not records:
        return {"bin_s": bin_s, "t": [], "output_tokens_per_s": [], "requests_per_s": [], "in_flight": []}
    t0 = min(r.start for r in records)
    bins = max(1, math.ceil((max(r.end for r in records) - t0) / bin_s + 1e-9))
    tokens, done, in_flight = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    index = lambda t: min(bins - 1, max(0, int((t - t0) / bin_s)))  # noqa: E731
    for r in records:
        if r.success and r.chunk_times:
            counts = r.token_counts if sum(r.token_counts) else [1] * len(r.chunk_times)
            scale = r.output_tokens / sum(counts) if sum(counts) else 0.0
            for t, k in zip(r.chunk_times, counts):
                tokens[index(t)] += k * scale
            done[index(r.end)] += 1
        in_flight[index(r.start):index(r.end) + 1] += 1
    return {"bin_s": bin_s, "t": [round(i * bin_s, 6) for i in range(bins)],
            "output_tokens_per_s": (tokens / bin_s).tolist(), "requests_per_s": (done / bin_s).tolist(),
            "in_flight": in_flight.tolist()}


def cdf(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their empirical cumulative fractions (for a CDF plot)."""
    xs = sorted(values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]

"""What `baton bench` shows and writes: the progress bar, the terminal summary (laid out
like vLLM's and SGLang's result blocks), the sweep table and the JSON file."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from baton.bench.serving.metrics import RequestRecord

WIDTH = 62


class Progress:
    """A one-line bar on stderr: requests done of total (or seconds of --duration) and errors.

    Redrawn at most 10 times a second on a terminal; elsewhere only the final line is printed."""

    def __init__(self, total: Optional[int], duration: Optional[float] = None, enabled: bool = True,
                 label: str = "", stream: Optional[TextIO] = None) -> None:
        self.total, self.duration, self.enabled, self.label = total, duration, enabled, label
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = self.errors = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, success: bool) -> None:
        self.done += 1
        self.errors += 0 if success else 1
        self._draw()

    def skip(self, n: int) -> None:
        """Requests that will not be sent after all (a session ended at a failed turn)."""
        if self.total is not None and n > 0:
            self.total -= n
            self._draw()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.duration:
            frac, count = min(1.0, elapsed / self.duration), f"{self.done} req"
        else:
            frac, count = (self.done / self.total if self.total else 1.0), f"{self.done}/{self.total} req"
        bar = "#" * int(frac * 30) + "." * (30 - int(frac * 30))
        return f"{self.label} |{bar}| {count} {elapsed:6.1f}s {self.errors} err"

    def _draw(self, force: bool = False) -> None:
        if not self.tty or (not force and time.monotonic() - self._drawn < 0.1):
            return
        self._drawn = time.monotonic()
        self.stream.write("\r" + self.line())
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _row(name: str, value: Any, digits: int = 2) -> str:
    text = _num(value, digits)
    return f"{name:<{WIDTH - 14}}{text:>14}"


def _title(text: str, fill: str = "-") -> str:
    return f" {text} ".center(WIDTH, fill)


def format_summary(run: dict, config: Any, model: str) -> str:
    """The terminal block of one run."""
    slo = ", ".join(f"{k}<={v:g}ms" for k, v in run["slo_ms"].items()) or "none"
    conc = config.max_concurrency if config.max_concurrency else "unlimited"
    lines = [_title("Serving Benchmark Result", "="),
             f"{'Model / endpoint:':<20}{model or '?'} / {config.endpoint}",
             f"{'Dataset:':<20}{config.dataset} ({run['workload']['requests']} planned requests)",
             f"{'Request rate:':<20}{run['request_rate']} req/s, max concurrency {conc}",
             _row("Successful requests:", run["completed"]), _row("Failed requests:", run["failed"]),
             _row("Benchmark duration (s):", run["duration_s"]),
             _row(f"Total input tokens ({run['input_tokens_counted_by']}):", run["total_input_tokens"]),
             _row(f"Total output tokens ({run['output_tokens_counted_by']}):", run["total_output_tokens"]),
             _row("Request throughput (req/s):", run["request_throughput"]),
             _row(f"Goodput (req/s, SLO {slo}):", run["goodput"]),
             _row("Input token throughput (tok/s):", run["input_throughput"]),
             _row("Output token throughput (tok/s):", run["output_throughput"]),
             _row("Total token throughput (tok/s):", run["total_token_throughput"]),
             _row("Prefix cache hit rate (usage.cached_tokens):", run["prefix_cache_hit_rate"], 3),
             _title("Latency (ms)"),
             f"{'':<10}{'mean':>12}{'median':>12}{'p90':>12}{'p99':>12}"]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms")):
        s = run[key]
        lines.append(f"{name:<10}" + "".join(f"{_num(s[k]):>12}" for k in ("mean", "median", "p90", "p99")))
    lines += _coalescing_lines(run["coalescing"])
    if run["errors"]:
        lines.append(_title("Errors"))
        for kind, count in run["errors"].items():
            lines.append(_row(f"{kind}:", count))
            example = run["error_examples"].get(kind, "")
            lines.append(f"    e.g. {example[:150]}" + ("..." if len(example) > 150 else ""))
    lines += _server_lines(run.get("server_metrics"))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _pct(fraction: Optional[float]) -> Optional[float]:
    return None if fraction is None else 100.0 * fraction


def _coalescing_lines(c: dict) -> list[str]:
    return [_title(f"Streaming (ITL per token; tokens counted by {c['tokens_counted_by']})"),
            _row("Text chunks (SSE events):", c["chunks"]),
            _row("Tokens per chunk (mean):", c["tokens_per_chunk_mean"]),
            _row("Chunks carrying > 1 token (%):", _pct(c["multi_token_chunk_fraction"]), 1),
            _row("Network reads carrying > 1 chunk (%):", _pct(c["multi_chunk_read_fraction"]), 1)]


def _server_lines(server: Optional[dict]) -> list[str]:
    if not server:
        return []
    if not server.get("is_baton"):
        return [_title("Server metrics"), server.get("note", "")]
    router = server["router"]
    lines = [_title("Baton (router /metrics, this run)"),
             _row("Retries:", int(router["retries"]), 0), _row("Migrations:", int(router["migrations"]), 0)]
    for reason, count in router["retries_by_reason"].items():
        lines.append(_row(f"  retries ({reason}):", int(count), 0))
    for path, count in router["paths"].items():
        lines.append(_row(f"Path {path}:", int(count), 0))
    lines += [_row("Router TTFT mean (ms):", router["ttft_mean_ms"]),
              _row("Router E2E mean (ms):", router["e2e_mean_ms"])]
    for key, label in (("prefix_cache_hit_rate", "Prefix cache hit rate (workers)"),
                       ("kv_transfer_bytes", "KV transfer bytes"), ("kv_transfer_failures", "KV transfer failures")):
        if server.get(key) is not None:
            lines.append(_row(label + ":", server[key]))
    for address, rate in (server.get("workers_prefix_hit_rate") or {}).items():
        lines.append(_row(f"Lifetime prefix hit rate {address}:", rate, 3))
    for name in server.get("unavailable", []):
        lines.append(f"n/a: {name}")
    return lines


def format_sweep(sweep: dict) -> str:
    """One row per rate: throughput, goodput, TTFT and TPOT."""
    head = f"{'rate':>8}{'req/s':>10}{'goodput':>10}{'out tok/s':>11}{'TTFT mean':>11}{'TTFT p99':>10}{'TPOT mean':>11}"
    rows = [_title("Sweep", "="), head]
    for i, rate in enumerate(sweep["request_rate"]):
        rows.append(f"{str(rate):>8}{_num(sweep['request_throughput'][i]):>10}{_num(sweep['goodput'][i]):>10}"
                    f"{_num(sweep['output_throughput'][i], 1):>11}{_num(sweep['ttft_ms_mean'][i], 1):>11}"
                    f"{_num(sweep['ttft_ms_p99'][i], 1):>10}{_num(sweep['tpot_ms_mean'][i], 1):>11}")
    return "\n".join(rows)


def _ms(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value * 1000.0, 3)


def record_json(r: RequestRecord) -> dict:
    """One request's timeline for the JSON file (milliseconds, rounded to the microsecond); chunk_reads
    numbers each chunk's network read from the first chunk's (equal neighbours came in one read)."""
    return {"session": r.session, "turn": r.turn, "start_s": round(r.start, 6), "success": r.success,
            "ttft_ms": _ms(r.ttft), "tpot_ms": _ms(r.tpot), "e2e_ms": _ms(r.e2e),
            "itl_ms": [_ms(x) for x in r.itls], "chunk_tokens": r.token_counts,
            "chunk_reads": [x - r.chunk_reads[0] for x in r.chunk_reads] if r.chunk_reads else None,
            "tokens_counted_by": r.tokens_counted_by, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "cached_tokens": r.cached_tokens, "max_tokens": r.max_tokens, "error_kind": r.error_kind or None,
            "error": r.error[:500] or None}


def write_json(path: str, doc: dict) -> None:
    """Write the result document (strict JSON: no NaN or infinity)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")

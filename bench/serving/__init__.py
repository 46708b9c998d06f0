"""`baton bench`: an online serving benchmark for any OpenAI-compatible server.

Streams requests through the official `openai` client and measures on the client side
TTFT, ITL (per token), TPOT and E2E latency, request / token throughput, goodput under SLOs
and how the stream coalesced, with the definitions of SGLang's `bench_serving` and vLLM's
`bench serve`; against Baton it also reports the router's counters from /metrics. Modules:
`config` (BenchConfig, the flags), `datasets` (offline, seeded workloads), `tokenizer` (the
served model's tokenizer: exact-length prompts, per-chunk token counts), `client` (one
AsyncOpenAI client, network reads observed), `metrics` (pure figures over request
timelines), `runner` (arrivals, concurrency, duration, warm-up, sweep),
`server_metrics` (Prometheus scrapes), `report` (terminal, JSON), `plots` (PNG charts);
`result_schema.json` describes the `--output` file.

    baton bench --base-url http://127.0.0.1:8000 --dataset shared-prefix --request-rate 4 \
        --slo ttft=500,tpot=50 --output result.json --plot plots/
"""
from __future__ import annotations

from pathlib import Path

from baton.bench.serving.config import BenchConfig

RESULT_SCHEMA_PATH = Path(__file__).with_name("result_schema.json")


def run(config: BenchConfig) -> dict:
    """Run a benchmark from Python and return its result document (nothing is written or plotted)."""
    import asyncio
    from baton.bench.serving.runner import run_benchmark
    return asyncio.run(run_benchmark(config))


def result_schema() -> dict:
    """The JSON schema of the `--output` document."""
    import json
    return json.loads(RESULT_SCHEMA_PATH.read_text(encoding="utf-8"))


__all__ = ["BenchConfig", "RESULT_SCHEMA_PATH", "result_schema", "run"]

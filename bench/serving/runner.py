"""Load generation for `baton bench`: arrivals, concurrency, duration, warm-up and sweeps.

One run sends a workload's sessions with gamma-distributed gaps between session starts
(shape `burstiness`, mean 1 / rate: Poisson when burstiness is 1; rate inf sends them all at
once), each session's turns one after another (a turn resends the history with the real
replies; a failed turn ends its session), at most `max_concurrency` requests in flight
(later arrivals wait for a slot, as in vLLM). With `duration` the workload is cycled and no
new request starts after `duration` seconds; what is in flight finishes and counts.
`run_benchmark` finds the tokenizer (`tokenizer.resolve_tokenizer`: exact-length prompts and,
after each run, per-chunk token counts where the server sent no per-chunk usage), does
warm-up, one run per rate (sweep point i uses seed + i, so its prompts are new to the
server's prefix cache), and scrapes /metrics around each run; `main` prints,
writes the JSON and the plots and returns the exit code (1 when no request succeeded).
"""
from __future__ import annotations

import asyncio
import datetime
import itertools
import math
import time
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np

from baton.bench.serving.client import BenchClient
from baton.bench.serving.config import BenchConfig, json_number
from baton.bench.serving.datasets import (Session, WordPrompts, build_dataset, describe, turn_messages,
                                         warmup_sessions)
from baton.bench.serving.metrics import RequestRecord, summarize, throughput_over_time
from baton.bench.serving.report import Progress, format_summary, format_sweep, record_json, write_json
from baton.bench.serving.server_metrics import baton_report, parse
from baton.bench.serving.tokenizer import TokenPrompts, chunk_token_counts, resolve_tokenizer

SCHEMA_VERSION = 1


def arrival_gaps(rng: np.random.Generator, rate: float, burstiness: float, n: int) -> np.ndarray:
    """`n` gaps (s) between session starts: gamma(shape=burstiness, mean=1/rate); zeros for rate inf."""
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


async def send_sessions(client: BenchClient, model: str, sessions: Sequence[Session], *, rate: float,
                        burstiness: float = 1.0, seed: int = 0, max_concurrency: Optional[int] = None,
                        duration: Optional[float] = None, progress: Optional[Progress] = None) -> list[RequestRecord]:
    """Send `sessions` (cycled when `duration` is set) and return every request's record."""
    records: list[RequestRecord] = []
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # rate inf with a duration is a closed loop: a new session starts when one ends.
    session_slots = asyncio.Semaphore(max_concurrency) if (duration and math.isinf(rate) and max_concurrency) else None
    rng = np.random.default_rng([seed, 2])
    client.set_clock(time.perf_counter())
    expired = lambda: duration is not None and client.now() >= duration  # noqa: E731

    async def run_session(session: Session) -> None:
        replies: list[str] = []
        prompt_tokens = sent = 0
        try:
            for turn in range(session.num_turns):
                if turn and expired():
                    break
                prompt_tokens += session.input_lens[turn]
                messages = turn_messages(session, turn, replies)
                if slots is not None:
                    async with slots:
                        rec = await client.send(model, messages, session.output_lens[turn], prompt_tokens,
                                                session.id, turn)
                else:
                    rec = await client.send(model, messages, session.output_lens[turn], prompt_tokens, session.id, turn)
                records.append(rec)
                sent += 1
                if progress is not None:
                    progress.update(rec.success)
                if not rec.success:
                    break
                replies.append(rec.text)
                prompt_tokens = rec.prompt_tokens + rec.output_tokens
        finally:
            if progress is not None and duration is None:
                progress.skip(session.num_turns - sent)
            if session_slots is not None:
                session_slots.release()

    jobs = itertools.cycle(sessions) if duration else iter(sessions)
    tasks = []
    target = 0.0
    for i, session in enumerate(jobs):
        if i:
            target += float(arrival_gaps(rng, rate, burstiness, 1)[0])
            if target > client.now():
                await asyncio.sleep(target - client.now())
        if session_slots is not None:
            await session_slots.acquire()
        if expired():
            break
        if duration:
            session = replace(session, id=i)
        tasks.append(asyncio.create_task(run_session(session)))
    await asyncio.gather(*tasks)
    records.sort(key=lambda r: (r.start, r.session, r.turn))
    return records


def count_chunk_tokens(records: Sequence[RequestRecord], tokenizer: object) -> None:
    """With a tokenizer: the tokens of each chunk of the requests without per-chunk usage (and their
    output count where the server sent no usage at all)."""
    if tokenizer is None:
        return
    for r in records:
        if r.tokens_counted_by == "usage" or not r.chunk_texts:
            continue
        r.chunk_tokens, r.tokens_counted_by = chunk_token_counts(tokenizer, r.chunk_texts), "tokenizer"
        if not r.output_tokens_from_usage:
            r.output_tokens = sum(r.chunk_tokens)


async def _scrape(client: BenchClient, enabled: bool) -> tuple[Optional[dict], Optional[str]]:
    if not enabled:
        return None, None
    return parse(await client.get_text("/metrics")), await client.get_text("/workers")


async def run_benchmark(config: BenchConfig, command: str = "") -> dict:
    """Warm-up, then one run per rate; returns the whole result document (see result_schema.json)."""
    rates, slos = config.rates(), config.slos()
    doc: dict = {"schema_version": SCHEMA_VERSION, "tool": "baton bench",
                 "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": command,
                 "config": config.to_json()}
    async with BenchClient(config.base_url, config.api_key, timeout_s=config.request_timeout,
                           max_connections=config.max_concurrency, endpoint=config.endpoint,
                           ignore_eos=config.ignore_eos, temperature=config.temperature,
                           continuous_usage=config.continuous_usage) as client:
        model, source = config.model, "flag"
        if not model:
            found = await client.first_model()
            model, source = (found, "/v1/models") if found else ("", "unknown (/v1/models did not answer)")
        root = None
        if model and not config.tokenizer and hasattr(client, "model_root"):
            root = await client.model_root(model)
        choice = resolve_tokenizer(config.tokenizer, model, root)
        prompts = TokenPrompts(choice.tokenizer) if choice.tokenizer is not None else WordPrompts()
        doc["server"] = {"base_url": client.root, "model": model, "model_source": source,
                         "tokenizer": choice.path or None, "tokenizer_source": choice.source}
        warm = warmup_sessions(config, config.seed, prompts)
        if warm:
            await send_sessions(client, model, warm, rate=math.inf, max_concurrency=config.max_concurrency)
        doc["runs"] = []
        for i, rate in enumerate(rates):
            seed = config.seed + i
            sessions = build_dataset(config, seed, prompts=prompts)
            workload = describe(sessions, prompts.source)
            progress = Progress(total=None if config.duration else workload["requests"], duration=config.duration,
                                enabled=config.progress, label=f"rate {json_number(rate)}")
            before, _ = await _scrape(client, config.scrape_metrics)
            records = await send_sessions(client, model, sessions, rate=rate, burstiness=config.burstiness, seed=seed,
                                          max_concurrency=config.max_concurrency, duration=config.duration,
                                          progress=progress)
            progress.close()
            count_chunk_tokens(records, choice.tokenizer)
            after, workers = await _scrape(client, config.scrape_metrics)
            summary = summarize(records, slos)
            bin_s = 1.0 if summary["duration_s"] >= 20 else max(summary["duration_s"] / 20, 0.05)
            run = {"request_rate": json_number(rate), "seed": seed, "workload": workload, **summary,
                   "server_metrics": (baton_report(before, after, workers, client.root + "/metrics")
                                      if config.scrape_metrics else None),
                   "throughput_over_time": throughput_over_time(records, bin_s),
                   "requests": [record_json(r) for r in records]}
            doc["runs"].append(run)
            print(format_summary(run, config, model), flush=True)
    doc["sweep"] = sweep_table(doc["runs"]) if len(rates) > 1 else None
    return doc


def sweep_table(runs: list[dict]) -> dict:
    """Per-rate columns of the figures a sweep plots."""
    pick = lambda key, stat=None: [r[key][stat] if stat else r[key] for r in runs]  # noqa: E731
    return {"request_rate": [r["request_rate"] for r in runs], "goodput": pick("goodput"),
            "request_throughput": pick("request_throughput"), "output_throughput": pick("output_throughput"),
            "ttft_ms_mean": pick("ttft_ms", "mean"), "ttft_ms_p99": pick("ttft_ms", "p99"),
            "tpot_ms_mean": pick("tpot_ms", "mean"), "e2e_ms_mean": pick("e2e_ms", "mean"),
            "failed": pick("failed")}


def main(config: BenchConfig, command: str = "") -> int:
    """Run the benchmark; print the summary, write --output / --plot; 0 when any request succeeded."""
    doc = asyncio.run(run_benchmark(config, command))
    if doc["sweep"] is not None:
        print(format_sweep(doc["sweep"]), flush=True)
    doc["plots"] = []
    if config.plot:
        from baton.bench.serving.plots import write_plots
        doc["plots"] = write_plots(doc, config.plot)
        print(f"plots: {', '.join(doc['plots'])}", flush=True)
    if config.output:
        write_json(config.output, doc)
        print(f"results: {config.output}", flush=True)
    return 0 if any(run["completed"] for run in doc["runs"]) else 1

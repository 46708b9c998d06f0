"""The engine thread's hand-off to asyncio on CPU: one `call_soon_threadsafe` per step vs one per token.

A worker's engine thread steps the engine and gives every request's `RequestDelta` to the asyncio
loop, where the servicer turns it into a gRPC message. Until 2026-12-01 it called
`loop.call_soon_threadsafe` once per delta: each call takes the loop's lock and writes a byte to
its self-pipe, and each wakes the loop's thread, which then contends for the GIL with the engine
thread that wants to launch the next step. On an H200 under decode-heavy serving load (6-8k
deltas/s), colocated goodput went from 0.59x to 1.03x `vllm serve` across the change (RESULTS.md,
two machines). This bench is the same-machine A/B on CPU: a real `EngineThread` over a real tiny
random-weight Llama engine (hidden 64, 2 layers: the model's compute is small, so the hand-off
shows), N concurrent greedy requests of M tokens each, every delta consumed by its own asyncio
task that encodes it as a gRPC `DecodeEvent`-like proto (`services.worker.wire.delta_to_proto`,
what the servicer does). "per-token" is a subclass whose `_hand_over` delivers as the old code did. Figures:
wall time, deltas per second, engine steps per second, the loop thread's and the engine
thread's CPU time per delta (`time.thread_time` in each), and `call_soon_threadsafe` calls.
Medians over --reps, modes interleaved.

    .venv/bin/python -m baton.bench.engine_delivery_cpu                 # 64 and 256 requests x 64 tokens
    .venv/bin/python -m baton.bench.engine_delivery_cpu --requests 128 --tokens 32 --reps 3
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from baton.bench.host_step_cpu import make_model  # noqa: E402
from baton.bench.machine import describe_machine, report  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m baton.bench.engine_delivery_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", default="64,256", help="comma-separated concurrent requests per run")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--results", default="", help="append the markdown section to this file")
    return p.parse_args(argv)


def thread_classes():
    from baton.services.worker.engine_thread import EngineThread

    class PerTokenThread(EngineThread):
        """The hand-off before 2026-12-01: one call_soon_threadsafe per delta."""

        def _hand_over(self, deltas) -> None:
            for delta in deltas:
                self._deliver(delta.parent_id, delta)

    return {"per-step": EngineThread, "per-token": PerTokenThread}


class CountingLoop(asyncio.SelectorEventLoop):
    """Counts call_soon_threadsafe calls."""
    calls = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.calls += 1
        return super().call_soon_threadsafe(*args, **kwargs)


def run_once(engine, thread_cls, requests: int, tokens: int, prompt_tokens: int) -> dict:
    from baton.services.engine.sampling_params import SamplingParams
    from baton.services.worker.wire import delta_to_proto

    loop = CountingLoop()
    engine_cpu = {}

    async def main():
        thread = thread_cls(engine, loop)
        original_run = thread._run

        def timed_run():
            original_run()
            engine_cpu["s"] = time.thread_time()
        thread._run = timed_run
        thread._thread = threading.Thread(target=thread._run, name="engine", daemon=True)
        ids = [f"r{i}" for i in range(requests)]
        streams = {rid: thread.open_stream(rid) for rid in ids}
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

        async def consume(rid):
            stream, count = streams[rid], 0
            while True:
                delta = await stream.get()
                delta_to_proto(delta)
                count += 1
                if delta.finish_reason:
                    thread.close_stream(rid)  # as the servicer does when its request ends
                    return count

        thread.start()
        loop_cpu0, t0 = time.thread_time(), time.perf_counter()
        steps0 = thread.steps
        consumers = [asyncio.ensure_future(consume(rid)) for rid in ids]

        def add_all(e):
            for i, rid in enumerate(ids):
                e.add_request(rid, [3 + (i * 7 + j) % 300 for j in range(prompt_tokens)], params)
        await thread.call(add_all)
        counts = await asyncio.gather(*consumers)
        wall, loop_cpu = time.perf_counter() - t0, time.thread_time() - loop_cpu0
        steps = thread.steps - steps0
        thread.stop()
        return sum(counts), wall, loop_cpu, steps

    try:
        deltas, wall, loop_cpu, steps = loop.run_until_complete(main())
    finally:
        loop.close()
    return {"deltas": deltas, "wall_s": wall, "deltas_per_s": deltas / wall, "steps_per_s": steps / wall,
            "loop_cpu_us_per_delta": 1e6 * loop_cpu / deltas, "engine_cpu_us_per_delta": 1e6 * engine_cpu["s"] / deltas,
            "threadsafe_calls_per_step": loop.calls / max(steps, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from baton.services.engine.config import EngineConfig
    from baton.services.engine.disagg import DisaggEngine
    counts = [int(x) for x in args.requests.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "tiny", max_len=args.prompt_tokens + args.tokens + 16)
        engine = DisaggEngine(EngineConfig(model=str(folder), kv_cache_tokens=max(counts) * (args.prompt_tokens
                              + args.tokens + 32), max_running_requests=max(counts), num_threads=1))
        modes = thread_classes()
        rows = []
        for n in counts:
            runs = {mode: [] for mode in modes}
            run_once(engine, modes["per-step"], n, 4, args.prompt_tokens)  # warm-up
            for _ in range(args.reps):
                for mode, cls in modes.items():
                    runs[mode].append(run_once(engine, cls, n, args.tokens, args.prompt_tokens))
            for mode, results in runs.items():
                rows.append((n, mode, {k: statistics.median(r[k] for r in results) for k in results[0]}))
    lines = [f"Machine: {describe_machine()}; {args.tokens} tokens per request, {args.prompt_tokens}-token prompts, "
             f"medians of {args.reps} runs per row, modes interleaved.", "",
             "| requests | hand-off | wall s | deltas/s | steps/s | loop CPU us/delta | engine CPU us/delta | "
             "call_soon_threadsafe per step |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, mode, m in rows:
        lines.append(f"| {n} | {mode} | {m['wall_s']:.3f} | {m['deltas_per_s']:,.0f} | {m['steps_per_s']:.0f} | "
                     f"{m['loop_cpu_us_per_delta']:.1f} | {m['engine_cpu_us_per_delta']:.1f} | "
                     f"{m['threadsafe_calls_per_step']:.1f} |")
    report("\n".join(lines), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A churn soak of the router against simulated workers: workers die, restart (new epoch,
empty cache) and join while a stream of mostly distinct prefixes flows; the router's RSS must
stay flat after warm-up and its KV-event index within its bound.

    .venv/bin/python -m baton.bench.router_soak --duration-s 60 --results bench/RESULTS.md
    .venv/bin/python -m baton.bench.router_soak --duration-s 1800      # the 30-minute soak

The simulated workers run in a child process that also drives the churn: every
`--churn-s` one live worker is killed and comes back `--down-s` later on the same port,
and a quarter of the ports start dead and join one by one during the first half. The router
core (static worker list, as a headless Service would give it) and `--concurrency` clients
run in this process; each request has a fresh random prompt (64-320 tokens) that shares a
64-token head with a few others, so nearly every block is a new prefix.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shlex
import sys
import time

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import BatonError
from baton.bench.machine import report


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


async def churn_child(spec: dict) -> None:
    from baton.protos.baton.v1 import worker_pb2
    from baton.services.sim.cluster import SimCluster
    from baton.services.sim.config import SimConfig, SimTiming
    from baton.services.common.server import free_port
    rng = random.Random(1)
    cluster = SimCluster(SimConfig(sim_decodes=0, sim_blocks=spec["blocks"]), SimTiming(**spec["timing"]))
    ports = [free_port() for _ in range(spec["workers"])]
    joining = ports[: len(ports) // 4]
    for port in ports[len(ports) // 4:]:
        await cluster.add(worker_pb2.DECODE, port=port)
    with open(spec["address_file"] + ".partial", "w") as out:
        json.dump([f"127.0.0.1:{p}" for p in ports], out)
    os.replace(spec["address_file"] + ".partial", spec["address_file"])
    started = time.monotonic()
    while time.monotonic() - started < spec["duration_s"] + 5:
        await asyncio.sleep(spec["churn_s"])
        if joining and time.monotonic() - started < spec["duration_s"] / 2:
            await cluster.add(worker_pb2.DECODE, port=joining.pop())
        live = [w for w in cluster.decodes if not w.dead]
        if len(live) > 1:
            victim = rng.choice(live)
            await victim.kill()
            asyncio.get_running_loop().call_later(spec["down_s"], lambda v=victim: asyncio.ensure_future(
                cluster.restart(v)))


async def soak(args) -> dict:
    from baton.router.config import RouterConfig
    from baton.router.core import RouterCore
    from baton.router.types import RouterRequest
    import subprocess
    import tempfile
    path = os.path.join(tempfile.mkdtemp(prefix="baton-soak-"), "addresses.json")
    spec = {"workers": args.workers, "blocks": args.blocks, "duration_s": args.duration_s, "churn_s": args.churn_s,
            "down_s": args.down_s, "address_file": path,
            "timing": dict(prefill_base_s=0.001, prefill_token_s=2e-5, decode_step_s=0.005)}
    child = subprocess.Popen([sys.executable, "-m", "baton.bench.router_soak", "--child", json.dumps(spec)])
    try:
        while not os.path.exists(path):
            assert child.poll() is None, "the simulated workers died"
            await asyncio.sleep(0.1)
        addresses = json.load(open(path))
        core = RouterCore(RouterConfig(decode=",".join(addresses), decode_policy="cache_aware",
                                       decode_only_threshold=10 ** 9, health_interval_s=0.5, max_attempts=5,
                                       kv_index_max_entries=args.max_entries))
        await core.start()
        await core.registry.wait_first_check(30)
        await core.kv_events.wait_ready(30)
        rng = random.Random(0)
        heads = [[rng.randrange(32000) for _ in range(64)] for _ in range(2000)]
        stats = {"ok": 0, "failed": 0, "tokens": 0, "max_entries": 0}
        samples: list[tuple[float, float]] = []
        reasons: dict[str, int] = {}
        started = time.monotonic()
        stop_at = started + args.duration_s

        async def client(i: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                prompt = rng.choice(heads) + [rng.randrange(32000) for _ in range(rng.randrange(0, 256))]
                try:
                    async for chunk in core.generate(RouterRequest(f"c{i}-{n}", prompt, common_pb2.SamplingParams(
                            max_tokens=4), timeout_s=30)):
                        stats["tokens"] += len(chunk.token_ids)
                    stats["ok"] += 1
                except BatonError as error:
                    stats["failed"] += 1
                    reasons[error.code_name] = reasons.get(error.code_name, 0) + 1

        async def sampler() -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(1.0)
                samples.append((time.monotonic() - started, rss_mib()))
                stats["max_entries"] = max(stats["max_entries"], core.kv_index.entries)
        await asyncio.gather(sampler(), *(client(i) for i in range(args.concurrency)))
        await core.stop()
    finally:
        child.terminate()
        child.wait(20)
    warm = [rss for t, rss in samples if t >= args.duration_s * args.warmup_fraction]
    return {**stats, "requests_per_s": stats["ok"] / args.duration_s, "rss_warm_mib": warm[0],
            "rss_min_mib": min(warm), "rss_max_mib": max(warm), "rss_end_mib": warm[-1],
            "bound": args.max_entries, "reasons": reasons}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=512, help="KV blocks per simulated worker")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--churn-s", type=float, default=1.0, help="seconds between worker deaths")
    parser.add_argument("--down-s", type=float, default=3.0, help="seconds a killed worker stays down")
    parser.add_argument("--max-entries", type=int, default=50_000, help="the router's --kv-index-max-entries")
    parser.add_argument("--warmup-fraction", type=float, default=0.25)
    parser.add_argument("--results", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(churn_child(json.loads(args.child)))
        return 0
    result = asyncio.run(soak(args))
    growth = result["rss_max_mib"] / result["rss_warm_mib"] - 1
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from baton.bench.router_scale import machine
    text = "\n".join([
        f"## Router churn soak over simulated workers ({now})", "",
        f"- Command: `.venv/bin/python -m baton.bench.router_soak {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- Machine: {machine()}", f"- Date: {now}",
        f"- Workload: {args.workers} simulated decode workers ({args.blocks} blocks each; a quarter join during the "
        f"first half), one killed every {args.churn_s:g} s and restarted {args.down_s:g} s later (new epoch, empty "
        f"cache); {args.concurrency} clients, fresh random prompts of 64-320 tokens (2,000 shared 64-token heads), "
        f"4 output tokens, precise cache-aware routing, index bound {args.max_entries} entries; "
        f"{args.duration_s:g} s, RSS sampled every second, warm-up = the first {args.warmup_fraction:.0%}", "",
        "| requests ok | failed | req/s | RSS at warm-up MiB | min | max | end | growth after warm-up | "
        "index entries max | bound |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['ok']} | {result['failed']} | {result['requests_per_s']:.1f} | {result['rss_warm_mib']:.1f} | "
        f"{result['rss_min_mib']:.1f} | {result['rss_max_mib']:.1f} | {result['rss_end_mib']:.1f} | "
        f"{growth:+.1%} | {result['max_entries']} | {result['bound']} |", "",
        f"Failed requests by error: {result['reasons'] or 'none'}.",
        f"RSS after warm-up stays within {abs(growth):.1%} of its warm-up value (target 10%: "
        f"{'met' if growth <= 0.10 else 'missed'}); the index peaked at {result['max_entries']} of its "
        f"{result['bound']} entries ({'within' if result['max_entries'] <= result['bound'] else 'over'} its bound).",
        ""])
    report(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

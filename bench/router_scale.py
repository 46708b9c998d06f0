"""The router at scale, against simulated workers (services/sim) on this machine.

    .venv/bin/python -m baton.bench.router_scale --results bench/RESULTS.md

Two parts (`--part overhead|prefix|all`):

- overhead: one simulated decode worker answering at once (a timing model of zeros, one
  token per request), called directly (`Decode.Generate`), through a bare Python gRPC proxy
  (bench/grpc_floor_proxy.py: the floor of one grpc.aio hop) and through a `baton router`
  process (`Router.Generate`, decode-only, round robin); the reference is the direct call,
  measured in the same run. Sequential requests give the added latency (p50 / p99);
  `--concurrency` clients for `--overhead-s` give requests per second each way (and over the
  router's HTTP gateway, `POST /v1/completions`), and the
  measured server process's CPU time per request (/proc), which other load on the machine
  does not inflate the way it does wall-clock figures.
- prefix: the shared-prefix workload of bench/router_scale_prefix.py with 16, 64 and 256
  simulated decode workers (`--sizes`), under round-robin, min-load, approximate
  cache-aware and precise (KV events) cache-aware (with the default and a wider load guard,
  and with two router replicas), each run on freshly started workers; the reference is
  round-robin in the same run (throughput ratio) and the best possible hit rate (also the
  attainable best: pages already prefilled when each request was sent).

The simulated workers run in a child process (`--serve-sim`, one asyncio loop for all);
in the overhead part the router and the floor proxy are processes of their own and the
clients run in the bench process; in the prefix part the router core(s) and the clients
share the bench process. Everything shares this machine's
cores, so client, router and workers compete for CPU: the figures are those of the whole
loop on this machine, not of the router alone.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import grpc

from baton.bench.machine import report
from baton.bench.router_scale_prefix import POLICIES, WIDE_GUARD, PrefixWorkload, RunResult, run_policy
from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.services.common.server import free_ports, wait_for_health

ZERO = dict(prefill_base_s=0, prefill_token_s=0, prefill_attention_s=0, decode_step_s=0, decode_seq_s=0,
            decode_ctx_token_s=0, transfer_base_s=0)
PREFIX_TIMING = dict(prefill_base_s=0.002, prefill_token_s=4e-4, prefill_attention_s=1e-8, decode_step_s=0.02,
                     decode_seq_s=2e-4, decode_ctx_token_s=1e-8)
"""A slow-GPU shape: 1 000 uncached prompt tokens cost about 0.4 s of prefill, a cached page nothing; slow
enough that the workers, not this machine's CPU (clients and router share it), bound the throughput."""


# --- the simulated workers' child process ------------------------------------------------------------
def serve_sim_child(spec: str) -> int:
    from baton.services.common.server import ServerConfig
    from baton.services.sim.cluster import run_sim
    from baton.services.sim.config import SimConfig, SimFaults, SimTiming
    options = json.loads(spec)
    return run_sim(SimConfig(**options["config"]), SimTiming(**options["timing"]), SimFaults(),
                   ServerConfig(metrics_port=-1))


class SimProcess:
    """`--serve-sim` in a child process; its workers' addresses once they serve."""

    def __init__(self, config: dict, timing: dict, cpus: set[int] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="baton-sim-")
        path = Path(self.dir) / "addresses.json"
        spec = json.dumps({"config": {**config, "sim_address_file": str(path)}, "timing": timing})
        self.proc = subprocess.Popen([sys.executable, "-m", "baton.bench.router_scale", "--serve-sim", spec],
                                     preexec_fn=_pinned(cpus))
        deadline = time.monotonic() + 120
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the simulated workers did not start")
            time.sleep(0.1)
        self.addresses = json.loads(path.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _pinned(cpus: set[int] | None):
    """A `preexec_fn` that runs the child on `cpus` (None: anywhere), set before it starts any thread."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


# --- overhead ------------------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process `pid` and its live children (the processes of `baton router
    --processes`) have used (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _measure(call, sequential: int, concurrency: int, seconds: float, pid: int) -> dict:
    """Latency of `sequential` calls one at a time, then req/s of `concurrency` clients for
    `seconds`, and the CPU time process `pid` (the server measured) spent per request then."""
    for _ in range(50):
        await call()
    latencies = []
    for _ in range(sequential):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    done = [0]
    stop_at = time.monotonic() + seconds

    async def client():
        while time.monotonic() < stop_at:
            await call()
            done[0] += 1
    cpu, started = _cpu_s(pid), time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed, cpu = time.monotonic() - started, _cpu_s(pid) - cpu
    return {"p50_ms": statistics.median(latencies) * 1000, "p99_ms": _percentile(latencies, 0.99) * 1000,
            "req_per_s": done[0] / elapsed, "cpu_us_per_req": cpu / max(1, done[0]) * 1e6,
            "cpu_busy": cpu / elapsed}


async def _overhead(worker: str, servers: dict, sequential: int, concurrency: int, seconds: float,
                    router_channels: int = 1) -> dict:
    """`servers`: name -> (address of a Router service, or "" for the worker itself; pid). The router rows
    call over `router_channels` connections in turn (several processes on one port each take connections)."""
    prompt = list(range(64))
    params = common_pb2.SamplingParams(max_tokens=1)
    counter = [0]
    results = {}
    for name, (address, pid) in servers.items():
        if address.startswith("http://"):
            results[name] = await _http(address, prompt, sequential, concurrency, seconds, pid)
            continue
        count = router_channels if name.startswith("router") else 1
        channels = [grpc.aio.insecure_channel(address or worker, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(count)]  # a subchannel pool each: one TCP connection each
        try:
            decode = worker_pb2_grpc.DecodeStub(channels[0])
            routes = [router_pb2_grpc.RouterStub(channel) for channel in channels]

            async def direct():
                counter[0] += 1
                async for _ in decode.Generate(worker_pb2.DecodeRequest(request_id=f"d{counter[0]}",
                                                                        prompt_token_ids=prompt, params=params)):
                    pass

            async def routed():
                counter[0] += 1
                async for _ in routes[counter[0] % count].Generate(router_pb2.GenerateRequest(
                        token_ids=router_pb2.TokenIds(ids=prompt), params=params)):
                    pass
            results[name] = await _measure(routed if address else direct, sequential, concurrency, seconds, pid)
        finally:
            for channel in channels:
                await channel.close()
    return results


async def _http(url: str, prompt: list[int], sequential: int, concurrency: int, seconds: float, pid: int) -> dict:
    """The same request through the router's OpenAI gateway: POST /v1/completions (token-id
    prompt, 1 token, not streamed) over one pooled httpx client."""
    import httpx
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        body["model"] = model

        async def call():
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
        return await _measure(call, sequential, concurrency, seconds, pid)


def run_overhead(args) -> dict:
    from baton.services.engine.default_model import ensure_default_model
    # --pin: each measured server on a core of its own, the bench client and the worker on the other
    pin = args.pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    loop_cpus, server_cpus = ({cores[0]}, set(cores[1:2])) if pin else (None, None)
    router_cpus = set(cores[1:1 + args.router_processes]) if pin else None  # --router-processes N: N cores
    if pin:
        os.sched_setaffinity(0, loop_cpus)
    args.pinned = pin
    sim = SimProcess({"sim_decodes": 1, "sim_max_running": 1024, "sim_max_queued": 4096}, ZERO, loop_cpus)
    children = []
    try:
        worker = sim.addresses["decode"][0]
        extra = 2 * args.router_processes if args.router_processes > 1 else 0  # each router process's own pair
        port, calls_port, http_port, calls_http_port, floor_port, floor_calls_port, *own = free_ports(6 + extra)
        router = [sys.executable, "-m", "baton.deploy.cli", "router", "--model", str(ensure_default_model()),
                  "--decode", worker, "--decode-policy", "round_robin", "--decode-only-threshold", "1000000000"]
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_pinned(server_cpus))
        own_flags = ["--processes", str(args.router_processes), "--process-ports",
                     ",".join(f"{own[i]}:{own[i + 1]}" for i in range(0, len(own), 2))] if own else []
        children.append(subprocess.Popen([*router, "--grpc-port", str(port), "--http-port", str(http_port), *own_flags],
                                         **{**quiet, "preexec_fn": _pinned(router_cpus)}))
        children.append(subprocess.Popen([*router, "--grpc-port", str(calls_port), "--http-port", str(calls_http_port),
                                          "--no-decode-stream"], **quiet))
        children.append(subprocess.Popen([sys.executable, "-m", "baton.bench.grpc_floor_proxy", worker,
                                          str(floor_calls_port)], preexec_fn=_pinned(server_cpus)))
        children.append(subprocess.Popen([sys.executable, "-m", "baton.bench.grpc_floor_proxy", worker,
                                          str(floor_port), "--stream"], preexec_fn=_pinned(server_cpus)))
        servers = {"direct": ("", sim.proc.pid),
                   "floor_calls": (f"127.0.0.1:{floor_calls_port}", children[2].pid),
                   "floor": (f"127.0.0.1:{floor_port}", children[3].pid),
                   "router_calls": (f"127.0.0.1:{calls_port}", children[1].pid),
                   "router": (f"127.0.0.1:{port}", children[0].pid),
                   "http": (f"http://127.0.0.1:{http_port}", children[0].pid)}
        for address in [a for a, _ in list(servers.values())[1:5]] + [f"127.0.0.1:{p}" for p in own[1::2]]:
            asyncio.run(wait_for_health(address, 120))  # with --router-processes: each process on its own port too
        return asyncio.run(_overhead(worker, servers, args.sequential, args.concurrency, args.overhead_s,
                                     router_channels=4 * args.router_processes if own else 1))
    finally:
        for child in children:
            child.terminate()
            child.wait(20)
        sim.stop()


# --- shared prefix ---------------------------------------------------------------------------------------
def run_prefix(args) -> list[RunResult]:
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        load = PrefixWorkload(groups=args.groups, concurrency=min(args.max_concurrency, 2 * size),
                              duration_s=args.prefix_s)
        for policy in [p for p in POLICIES if not args.policies or p in args.policies.split(";")]:
            sim = SimProcess({"sim_decodes": size, "sim_blocks": args.blocks, "sim_max_running": 64}, PREFIX_TIMING)
            try:
                result = asyncio.run(run_policy(policy, sim.addresses["decode"], load))
            finally:
                sim.stop()
            print(f"{size} workers, {policy}: {result.req_per_s:.1f} req/s, TTFT p50 {result.ttft_p50_ms:.1f} ms, "
                  f"hit {result.hit_rate:.3f} / best {result.best_hit_rate:.3f} "
                  f"(attainable {result.attainable_hit_rate:.3f})", flush=True)
            results.append(result)
    return results


# --- report -------------------------------------------------------------------------------------------------
def machine() -> str:
    try:
        from baton.bench.machine import describe_machine
        load = os.getloadavg()
        return describe_machine(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) "
                                "when the report was written")
    except ImportError:
        return f"{os.cpu_count()} cores"


def _overhead_lines(args, overhead: dict) -> list[str]:
    d, f, r = overhead["direct"], overhead["floor"], overhead["router"]
    per_core = 1e6 / max(r["cpu_us_per_req"], 1e-9)
    row = lambda name, m, ref: (f"| {name} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['req_per_s']:.0f} | "
                                f"{m['req_per_s'] / ref:.2f} | {m['cpu_us_per_req']:.0f} | {m['cpu_busy']:.2f} |")
    return ["- Overhead workload: one simulated decode worker with a zero timing model, 64-token prompt, "
            f"1 output token; {args.sequential} sequential requests (latency), then {args.concurrency} concurrent "
            f"clients for {args.overhead_s:g} s (req/s). "
            + ("Pinned (`--pin`): the server measured runs on a core of its own, the bench client (grpc.aio, one "
               "process) and the worker process share another, so a server's req/s is its capacity on one core "
               "(the direct row: client and worker on their one core). " if getattr(args, "pinned", False) else
               "Three processes share the cores: the bench client (grpc.aio, one process), the server measured, "
               "and the worker process. ")
            + (f"`baton router --processes {args.router_processes}` for the router rows (one process before it; "
               f"its gRPC rows call over {4 * args.router_processes} connections in turn"
               + (f", on {args.router_processes} cores of its own" if getattr(args, "pinned", False) else "")
               + "; its CPU counts every process). " if getattr(args, "router_processes", 1) > 1 else "")
            + "CPU us/req is the measured "
            "server process's own CPU time (/proc utime + stime) during the req/s phase divided by the requests "
            "(for the direct row: the worker process); cores busy = that CPU time / wall time", "",
            "| path | p50 ms | p99 ms | req/s | x direct req/s | server CPU us/req | server cores busy |",
            "|---|---:|---:|---:|---:|---:|---:|",
            row("direct `Decode.Generate` (reference)", d, d["req_per_s"]),
            *([row("bare Python gRPC hop, a call per request (bench/grpc_floor_proxy.py)", overhead["floor_calls"],
                   d["req_per_s"])] if "floor_calls" in overhead else []),
            row("bare Python gRPC hop, one stream to the worker (`grpc_floor_proxy --stream`)", f, d["req_per_s"]),
            *([row("through `baton router --no-decode-stream` (a call per request, the old data plane)",
                   overhead["router_calls"], d["req_per_s"])] if "router_calls" in overhead else []),
            row("through `baton router` (`Router.Generate`, one stream per worker)", r, d["req_per_s"]),
            *([row("through the router's HTTP gateway (`POST /v1/completions`, httpx client)", overhead["http"],
                   d["req_per_s"])] if "http" in overhead else []), "",
            f"Added by the router: p50 **{r['p50_ms'] - d['p50_ms']:.2f} ms**, p99 "
            f"**{r['p99_ms'] - d['p99_ms']:.2f} ms**; **{r['req_per_s']:.0f} req/s** through it "
            + ("on a core of its own (the client and worker on another; pinned, the direct row's latency is that of "
               "a client and worker sharing one core, so read added latency from an unpinned run)"
               if getattr(args, "pinned", False) else "with the client and worker on the same cores")
            + " (targets: p50 < 1 ms added, >= 2,000 req/s: "
            f"{'met' if r['p50_ms'] - d['p50_ms'] < 1 else 'missed'} / "
            f"{'met' if r['req_per_s'] >= 2000 else 'missed'}). The router process spends "
            f"{r['cpu_us_per_req']:.0f} us of CPU per request, so one core to itself would carry at most "
            f"~{per_core:.0f} req/s (derived, not measured); the bare hop (same data plane) adds p50 "
            f"{f['p50_ms'] - d['p50_ms']:.2f} ms and spends {f['cpu_us_per_req']:.0f} us/req: the router's own "
            f"work is the difference ({r['p50_ms'] - f['p50_ms']:.2f} ms p50, "
            f"{r['cpu_us_per_req'] - f['cpu_us_per_req']:.0f} us CPU per request)."
            + (f" Over HTTP the router process spends {overhead['http']['cpu_us_per_req']:.0f} us per request "
               "(JSON, the OpenAI shapes and the ASGI server on top of the same core); the Python httpx client "
               "shares the cores too, so its req/s is a floor of what the gateway carries."
               if "http" in overhead else ""), ""]


def section(args, overhead: dict | None, prefix: list[RunResult]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Router at scale: overhead and cache-aware routing over simulated workers ({now})", "",
             f"- Command: `.venv/bin/python -m baton.bench.router_scale {shlex.join(args.argv)}`",
             f"- Machine: {machine()}", f"- Date: {now}"]
    if overhead:
        lines += _overhead_lines(args, overhead)
    if prefix:
        load = PrefixWorkload()
        lines += [f"- Prefix workload (bench/router_scale_prefix.py): {args.groups} groups, {load.users} users each, "
                  f"{load.turns} turns, system prompt {load.system_len} tokens, user turns {load.user_len} tokens, "
                  f"{load.output_len} output tokens; closed loop, min(2 x workers, {args.max_concurrency}) clients, "
                  f"{args.prefix_s:g} s per run; simulated workers: {args.blocks} blocks of 16 tokens each, "
                  f"timing {PREFIX_TIMING}; fresh workers for every run; router core(s) and clients in one process, "
                  f"workers in another; cache-aware guard = the default balance_abs_threshold 4096 (decode "
                  f"workers: queued tokens + 64 per request), wide guard = {WIDE_GUARD:g}; attainable best = the "
                  f"best possible counting only pages prefilled before each request was sent", "",
                  "| workers | policy | requests | req/s | x round-robin | TTFT p50 ms | TTFT p99 ms | hit rate | "
                  "best possible | hit / best | attainable best | hit / attainable |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        base = {r.workers: r.req_per_s for r in prefix if r.policy == "round_robin"}
        for r in prefix:
            lines.append(f"| {r.workers} | {r.policy} | {r.requests} | {r.req_per_s:.1f} | "
                         f"{r.req_per_s / base[r.workers]:.2f} | {r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | "
                         f"{r.hit_rate:.3f} | {r.best_hit_rate:.3f} | {r.hit_rate / max(r.best_hit_rate, 1e-9):.2f} | "
                         f"{r.attainable_hit_rate:.3f} | {r.hit_rate / max(r.attainable_hit_rate, 1e-9):.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["overhead", "prefix", "all"], default="all")
    parser.add_argument("--results", default="", help="append a section to this RESULTS.md")
    parser.add_argument("--sequential", type=int, default=500, help="sequential requests for the latency figures")
    parser.add_argument("--concurrency", type=int, default=32, help="clients for the req/s figures")
    parser.add_argument("--overhead-s", type=float, default=8.0, help="seconds of each req/s measurement")
    parser.add_argument("--router-processes", type=int, default=1,
                        help="overhead: `baton router --processes N` for the router rows (pinned: on N cores of its own)")
    parser.add_argument("--pin", action="store_true",
                        help="overhead: each measured server on a core of its own, the client and worker on another "
                             "(req/s is then the server's capacity on one core)")
    parser.add_argument("--sizes", default="16,64,256", help="simulated decode workers per prefix run")
    parser.add_argument("--groups", type=int, default=64, help="prefix groups of the shared-prefix workload")
    parser.add_argument("--prefix-s", type=float, default=8.0, help="seconds of each prefix run")
    parser.add_argument("--max-concurrency", type=int, default=64, help="most clients of a prefix run")
    parser.add_argument("--policies", default="", help="';'-separated subset of the policies (default: all)")
    parser.add_argument("--blocks", type=int, default=768, help="KV blocks per simulated worker")
    parser.add_argument("--serve-sim", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sim:
        return serve_sim_child(args.serve_sim)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    overhead = run_overhead(args) if args.part in ("overhead", "all") else None
    if overhead:
        print(json.dumps(overhead, indent=1), flush=True)
    prefix = run_prefix(args) if args.part in ("prefix", "all") else []
    text = section(args, overhead, prefix)
    report(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

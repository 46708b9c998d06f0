"""CPU cost of the router's OpenAI HTTP gateway, per request and per streamed chunk.

    .venv/bin/python -m baton.bench.gateway_cpu [--seconds 8] [--h11] [--gateway-dir DIR] [--profile DIR]

One simulated decode worker answering at once (a timing model of zeros, services/sim, in a
child process as in bench/router_scale.py's overhead part) and one `baton router` process
(decode-only, round robin) whose HTTP gateway an httpx client in this process calls:

- (a) `POST /v1/completions`, 64-token token-id prompt, `max_tokens: 1`, not streamed, at
  `--rate` requests per second: the router process's CPU microseconds per request;
- (b) `POST /v1/chat/completions` (or `/v1/completions`, `--stream-api completions`) with
  `stream: true` and `max_tokens: 128`, `--stream-rate` streams started per second: the
  router's CPU microseconds per streamed chunk (one chunk per output token, each its own SSE
  event, checked unless `--no-check`; `[DONE]` not counted).

Both loads are open loop by default (a fixed offered rate, so every variant measured sees the
same load and the same event-loop wake-ups); rate 0 makes them closed loops of `--concurrency` /
`--stream-concurrency` clients (throughput, bound here by the Python client). Router CPU is its
process's utime + stime from /proc during the phase, which other load on the machine inflates far
less than wall-clock figures; client, router and worker still share this machine's cores.
`--h11` hides `httptools` from the router process (a stub package on its PYTHONPATH), so uvicorn
serves HTTP/1.1 with the pure-Python h11, as where httptools is not installed; `--gateway-dir DIR`
loads the package `baton.router.gateway` from DIR (a copy of an older router/gateway) in the
router process: before / after figures on one machine. `--profile DIR` records the router under
each load with py-spy (raw collapsed stacks, `DIR/a.txt` and `DIR/b.txt`; `--profile-gil`: only
the thread holding the GIL), needing `py-spy` next to this Python.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baton.bench.router_scale import ZERO, SimProcess, _cpu_s, machine
from baton.services.common.server import free_port, wait_for_health
from baton.bench.machine import report

PROMPT = list(range(64))
_HIDE_HTTPTOOLS = "raise ImportError('hidden by bench/gateway_cpu.py --h11')\n"


_GATEWAY_FROM = """
import importlib.util, runpy, sys
import baton.router
spec = importlib.util.spec_from_file_location("baton.router.gateway", {init!r}, submodule_search_locations=[{dir!r}])
gateway = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gateway
baton.router.gateway = gateway
spec.loader.exec_module(gateway)
sys.argv[0] = "baton"
runpy.run_module("baton.deploy.cli", run_name="__main__")
"""


def router_command(gateway_dir: str) -> list[str]:
    """`python -m baton.deploy.cli`, or with the package baton.router.gateway loaded from `gateway_dir`."""
    if not gateway_dir:
        return [sys.executable, "-m", "baton.deploy.cli"]
    folder = Path(gateway_dir).resolve()
    return [sys.executable, "-c", _GATEWAY_FROM.format(init=str(folder / "__init__.py"), dir=str(folder))]


def start_router(worker: str, h11: bool, gateway_dir: str = "") -> tuple[subprocess.Popen, str, str]:
    """A `baton router` process in front of `worker`; (process, gRPC address, HTTP base url)."""
    from baton.services.engine.default_model import ensure_default_model
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ)
    if h11:
        stub = Path(tempfile.mkdtemp(prefix="baton-h11-")) / "httptools"
        atexit.register(shutil.rmtree, stub.parent, True)
        stub.mkdir()
        (stub / "__init__.py").write_text(_HIDE_HTTPTOOLS)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub.parent), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [*router_command(gateway_dir), "router", "--model", str(ensure_default_model()),
         "--decode", worker, "--decode-policy", "round_robin", "--decode-only-threshold", "1000000000",
         "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return proc, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"


class Profiler:
    """py-spy recording the router while a phase runs (nothing when `directory` is empty)."""

    def __init__(self, directory: str, pid: int, gil: bool = False) -> None:
        self.directory, self.pid, self.gil = directory, pid, gil
        self.py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        self.proc: subprocess.Popen | None = None

    def start(self, name: str, seconds: float) -> None:
        if not self.directory or not self.py_spy:
            return
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.py_spy, "record", "-p", str(self.pid), "-d", str(max(1, int(seconds) - 1)), "-r", "200",
             "-f", "raw", "-o", str(Path(self.directory) / f"{name}.txt"), "--nonblocking", *(["--gil"] if self.gil else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.wait(60)
            self.proc = None


async def _load(call, concurrency: int, rate: float, seconds: float, pid: int) -> dict:
    """`call()` (which returns a count) for `seconds`: at `rate` calls per second (open loop, at most
    `concurrency` outstanding; a call that would pass that is skipped and counted), or, with rate 0,
    from `concurrency` clients back to back (closed loop). Totals and the router's CPU seconds meanwhile."""
    count, calls, skipped = [0], [0], [0]
    stop_at = time.monotonic() + seconds
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        try:
            n = await call()  # not `count[0] += await call()`: that reads count[0] before the await
            count[0] += n
            calls[0] += 1
        finally:
            slots.release()

    async def client() -> None:
        while time.monotonic() < stop_at:
            await slots.acquire()
            await one()

    async def paced() -> None:
        tasks, due = [], time.monotonic()
        while due < stop_at:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            due += 1.0 / rate
            if slots.locked():
                skipped[0] += 1
                continue
            await slots.acquire()
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    cpu, started = _cpu_s(pid), time.monotonic()
    await (paced() if rate > 0 else asyncio.gather(*(client() for _ in range(concurrency))))
    elapsed, cpu = time.monotonic() - started, _cpu_s(pid) - cpu
    return {"calls": calls[0], "count": count[0], "skipped": skipped[0], "elapsed_s": elapsed, "cpu_s": cpu}


def _stream_events(text: str) -> int:
    """The token-carrying events of one SSE body (checked to end with `[DONE]`)."""
    events = [e for e in text.split("\n\n") if e]
    if not events or events[-1] != "data: [DONE]":
        raise RuntimeError(f"stream did not end with [DONE]: {text[-200:]!r}")
    carrying = 0
    for event in events[:-1]:
        choices = json.loads(event[len("data: "):])["choices"]
        if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
            carrying += 1
    return carrying


async def _served_model(client, timeout_s: float = 60.0) -> str:
    """The gateway's model id, once it answers (it starts after the router's gRPC server)."""
    import httpx
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return (await client.get("/v1/models")).json()["data"][0]["id"]
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def measure(url: str, pid: int, args, profiler: Profiler) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=max(args.concurrency, args.stream_concurrency))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        model = await _served_model(client)
        one = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        if args.stream_api == "chat":
            path = "/v1/chat/completions"
            streamed = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}]}
        else:
            path, streamed = "/v1/completions", {"model": model, "prompt": PROMPT}
        streamed.update(max_tokens=args.tokens, temperature=0, stream=True)
        if args.continuous_usage:  # what `baton bench` sends: the usage so far on every chunk
            streamed["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}

        async def non_streamed() -> int:
            response = await client.post("/v1/completions", json=one)
            response.raise_for_status()
            return 1

        async def stream() -> int:
            async with client.stream("POST", path, json=streamed) as response:
                response.raise_for_status()
                text = (await response.aread()).decode()
            if args.check:
                events = _stream_events(text)
                if events != args.tokens:
                    raise RuntimeError(f"{events} token events, expected {args.tokens}")
            return args.tokens

        for _ in range(args.warmup):
            await non_streamed()
            await stream()
        cpu = _cpu_s(pid)
        await asyncio.sleep(args.idle_s)
        idle = {"calls": 0, "count": 0, "skipped": 0, "elapsed_s": args.idle_s, "cpu_s": _cpu_s(pid) - cpu}
        profiler.start("a", args.seconds)
        a = await _load(non_streamed, args.concurrency, args.rate, args.seconds, pid)
        profiler.stop()
        profiler.start("b", args.seconds)
        b = await _load(stream, args.stream_concurrency, args.stream_rate, args.seconds, pid)
        profiler.stop()
    return {"idle": idle, "a": a, "b": b}


def section(args, result: dict) -> str:
    """The markdown section of one run."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    a, b = result["a"], result["b"]
    http = "h11 (httptools hidden)" if args.h11 else ("httptools" if _has_httptools() else "h11")
    if args.continuous_usage:
        http += ", streams with continuous usage"
    stream_path = "/v1/chat/completions" if args.stream_api == "chat" else "/v1/completions"
    return "\n".join([
        f"## Gateway CPU ({now})", "",
        f"- Command: `.venv/bin/python -m baton.bench.gateway_cpu {shlex.join(args.argv)}`",
        f"- Machine: {machine()}", f"- Date: {now}; uvicorn HTTP: {http}; gateway code: "
        f"{args.gateway_dir or 'router/gateway (this checkout)'}",
        "- One simulated decode worker (zero timing model), one `baton router` process, an httpx client in the "
        "bench process; router CPU = its /proc utime + stime during the phase; idle, the router uses "
        f"{result['idle']['cpu_s'] / result['idle']['elapsed_s']:.3f} cores (background loops), included below", "",
        "| load | offered | s | requests done (skipped) | req/s | chunks/s | router CPU us/req | "
        "router CPU us/chunk | router cores busy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        _row("(a) `POST /v1/completions`, 1 token, not streamed", _offered(args.rate, args.concurrency), a, False),
        _row(f"(b) `POST {stream_path}`, stream, {args.tokens} tokens",
             _offered(args.stream_rate, args.stream_concurrency), b, True), ""])


def _offered(rate: float, concurrency: int) -> str:
    return f"{rate:g}/s, <= {concurrency} open" if rate > 0 else f"closed loop, {concurrency} clients"


def _row(name: str, offered: str, m: dict, per_chunk: bool) -> str:
    def us(n: int) -> float:
        return m["cpu_s"] / max(1, n) * 1e6
    chunks, per = (f"{m['count'] / m['elapsed_s']:.0f}", f"{us(m['count']):.1f}") if per_chunk else ("-", "-")
    return (f"| {name} | {offered} | {m['elapsed_s']:.1f} | {m['calls']} ({m['skipped']}) | "
            f"{m['calls'] / m['elapsed_s']:.1f} | {chunks} | {us(m['calls']):.0f} | {per} | "
            f"{m['cpu_s'] / m['elapsed_s']:.2f} |")


def _has_httptools() -> bool:
    import importlib.util
    return importlib.util.find_spec("httptools") is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of each measured phase")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="requests per second of phase (a), open loop (0: closed loop of --concurrency clients)")
    parser.add_argument("--stream-rate", type=float, default=16.0,
                        help="streams started per second in phase (b), open loop (0: closed loop)")
    parser.add_argument("--concurrency", type=int, default=32, help="most requests outstanding in phase (a)")
    parser.add_argument("--stream-concurrency", type=int, default=32, help="most streams outstanding in phase (b)")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens of each streamed request")
    parser.add_argument("--stream-api", choices=["chat", "completions"], default="chat",
                        help="the streamed phase's endpoint")
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds of the idle router's CPU figure")
    parser.add_argument("--warmup", type=int, default=20, help="requests of each kind before measuring")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not parse the streamed events (less client CPU)")
    parser.add_argument("--h11", action="store_true", help="hide httptools from the router (uvicorn uses h11)")
    parser.add_argument("--continuous-usage", action="store_true", help="phase (b) asks for the usage on every "
                        "chunk (stream_options.continuous_usage_stats, as `baton bench` does)")
    parser.add_argument("--gateway-dir", default="",
                        help="serve baton.router.gateway from this folder (a copy of an older router/gateway)")
    parser.add_argument("--profile", default="", help="record the router with py-spy into this folder")
    parser.add_argument("--profile-gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    parser.add_argument("--results", default="", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    sim = SimProcess({"sim_decodes": 1, "sim_max_running": 1024, "sim_max_queued": 4096}, ZERO)
    router = None
    try:
        router, address, url = start_router(sim.addresses["decode"][0], args.h11, args.gateway_dir)
        asyncio.run(wait_for_health(address, 120))
        result = asyncio.run(measure(url, router.pid, args, Profiler(args.profile, router.pid, args.profile_gil)))
    finally:
        if router is not None:
            router.terminate()
            router.wait(20)
        sim.stop()
    print(json.dumps(result), flush=True)
    text = section(args, result)
    report(text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

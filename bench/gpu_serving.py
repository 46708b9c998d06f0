"""Serving comparison on a GPU machine: for each `--server NAME=COMMAND` in turn, start the
command (e.g. `vllm serve ...` or `baton up ...`; `{port}` in it becomes a free port), wait
for it to answer /v1/models (and /health, where it has one) before a deadline, run `baton
bench` (`bench.serving.runner.run_benchmark`, in-process) over the request rates for each
workload, stop it (SIGINT to its process group, SIGTERM, then SIGKILL after grace periods)
and write NAME.json (the bench documents, per-request timelines dropped unless
--keep-requests), NAME.md and, over all servers, summary.md.

Workloads (`WORKLOADS`; `--set FIELD=VALUE` overrides any `BenchConfig` field in all of them):
- prefill-heavy: the random dataset, 256-2048 prompt tokens and 32-384 output tokens;
- decode-heavy: the sharegpt-like dataset (means of about 161 prompt and 338 output tokens).
Goodput counts requests with TTFT <= 1000 ms and TPOT <= 50 ms (`--slo`). Every server gets
the same prompts (same seed; pass --tokenizer so they come from the same tokenizer: exact
token lengths). The tables give goodput, TTFT and per-token ITL p50 / p99, failed requests
and how often chunks coalesced (text chunks carrying > 1 token, network reads > 1 chunk).

    python -m baton.bench.gpu_serving --tokenizer /models/llama-8b --out $OUT/serving \\
        --server vllm="vllm serve /models/llama-8b --port {port}" \\
        --server baton="baton up --model /models/llama-8b --port {port}" --rates 4,8,16,24
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from baton.bench.serving.config import BenchConfig
from baton.bench.serving.report import write_json

WORKLOADS: dict[str, dict[str, Any]] = {
    "prefill-heavy": dict(dataset="random", input_len=2048, input_len_min=256, output_len=384, output_len_min=32),
    "decode-heavy": dict(dataset="sharegpt-like"),
}
DEFAULT_SLO = "ttft=1000,tpot=50"
DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServerSpec:
    """One server to measure."""

    name: str
    """Label in the tables and file names."""
    command: str
    """Shell command that serves the OpenAI API; `{port}` is replaced by the port."""


@dataclass(frozen=True)
class DriverConfig:
    """What `gpu_serving` runs: servers, workloads, rates and where results go."""

    servers: tuple[ServerSpec, ...]
    """Servers, measured one after another."""
    rates: str = "4,8,16,24"
    """Request rates (req/s, Poisson) of each workload's sweep."""
    num_prompts: int = 400
    """Requests per rate and workload."""
    workloads: tuple[str, ...] = ("prefill-heavy", "decode-heavy")
    """Names from WORKLOADS."""
    tokenizer: str = ""
    """Tokenizer for exact-length prompts (empty: each bench finds the served model's)."""
    model: str = ""
    """Model name sent with requests (empty: the first one /v1/models lists)."""
    out: str = "gpu_serving"
    """Folder for NAME.json, NAME.md, NAME.log and summary.md."""
    host: str = "127.0.0.1"
    """Where the servers listen."""
    port: int = 0
    """Port for {port} (0: a free one) and for commands without {port} (0: 8000)."""
    ready_timeout_s: float = 1800.0
    """Seconds a server may take to answer /v1/models."""
    stop_grace_s: float = 60.0
    """Seconds after SIGINT (then after SIGTERM) before the next signal."""
    slo: str = DEFAULT_SLO
    """Goodput SLOs (ms)."""
    endpoint: str = "completions"
    """OpenAI API to call (completions: the prompt is sent as is, exactly its token count)."""
    warmup: int = 8
    """Warm-up requests before each workload."""
    max_concurrency: Optional[int] = None
    """Most requests in flight (default: no limit)."""
    seed: int = 0
    """Workload seed (the same for every server)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """BenchConfig fields set for every workload (--set)."""
    keep_requests: bool = False
    """Keep the per-request timelines in NAME.json."""


def parse_server(text: str) -> ServerSpec:
    """`NAME=COMMAND`, NAME of letters, digits, `.`, `_` and `-` (it names the output files)."""
    name, sep, command = text.partition("=")
    if not sep or not re.fullmatch(r"[\w.-]+", name.strip()) or not command.strip():
        raise argparse.ArgumentTypeError(f"--server wants NAME=COMMAND with a plain NAME, not {text!r}")
    return ServerSpec(name.strip(), command.strip())


def parse_override(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` for a BenchConfig field, VALUE converted to the field's type ("none": None)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    hints = typing.get_type_hints(BenchConfig)
    if not sep or key not in hints:
        raise argparse.ArgumentTypeError(f"--set wants FIELD=VALUE with a BenchConfig field, not {text!r}")
    tp, args = hints[key], typing.get_args(hints[key])
    if type(None) in args:
        if raw.strip().lower() == "none":
            return key, None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            return key, {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[raw.lower()]
        return key, tp(raw) if tp in (int, float) else raw
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"--set {key}: {raw!r} is not a {getattr(tp, '__name__', tp)}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m baton.bench.gpu_serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", action="append", type=parse_server, required=True, metavar="NAME=COMMAND",
                   help="a server command to measure (repeatable; {port} becomes the port)")
    p.add_argument("--rates", default=DriverConfig.rates, help="request rates, comma-separated")
    p.add_argument("--num-prompts", type=int, default=DriverConfig.num_prompts, help="requests per rate")
    p.add_argument("--workloads", default=",".join(DriverConfig.workloads), help=f"of {', '.join(WORKLOADS)}")
    p.add_argument("--tokenizer", default="", help="tokenizer folder / hub id for exact-length prompts")
    p.add_argument("--model", default="", help="model name to request (default: the first /v1/models lists)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_serving"), help="output folder")
    p.add_argument("--host", default=DriverConfig.host)
    p.add_argument("--port", type=int, default=0, help="port for {port} (0: a free one)")
    p.add_argument("--ready-timeout", type=float, default=DriverConfig.ready_timeout_s, help="seconds to start")
    p.add_argument("--stop-grace", type=float, default=DriverConfig.stop_grace_s, help="seconds per stop signal")
    p.add_argument("--slo", default=DEFAULT_SLO, help="goodput SLOs in ms")
    p.add_argument("--endpoint", choices=["completions", "chat"], default=DriverConfig.endpoint)
    p.add_argument("--warmup", type=int, default=DriverConfig.warmup, help="warm-up requests per workload")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                   metavar="FIELD=VALUE", help="set a BenchConfig field in every workload (repeatable)")
    p.add_argument("--keep-requests", action="store_true", help="keep per-request timelines in the JSON")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> DriverConfig:
    args = build_parser().parse_args(argv)
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    unknown = [w for w in workloads if w not in WORKLOADS]
    names = [s.name for s in args.server]
    if unknown or not workloads:
        raise SystemExit(f"--workloads: unknown {unknown or 'none given'}; known: {', '.join(WORKLOADS)}")
    if len(set(names)) != len(names):
        raise SystemExit(f"--server: names must differ ({', '.join(names)})")
    config = DriverConfig(servers=tuple(args.server), rates=args.rates, num_prompts=args.num_prompts,
                          workloads=workloads, tokenizer=args.tokenizer, model=args.model, out=args.out,
                          host=args.host, port=args.port, ready_timeout_s=args.ready_timeout,
                          stop_grace_s=args.stop_grace, slo=args.slo, endpoint=args.endpoint, warmup=args.warmup,
                          max_concurrency=args.max_concurrency, seed=args.seed, overrides=dict(args.overrides),
                          keep_requests=args.keep_requests)
    try:
        for w in workloads:
            bench_config(config, w, "http://x")  # every value is checked before a server starts
    except (TypeError, ValueError) as error:
        raise SystemExit(f"gpu_serving: {error}") from None
    return config


def bench_config(config: DriverConfig, workload: str, base_url: str) -> BenchConfig:
    """The BenchConfig of one workload against one server."""
    return BenchConfig(**{**dict(base_url=base_url, model=config.model, endpoint=config.endpoint,
                                 num_prompts=config.num_prompts, sweep_rates=config.rates, slo=config.slo,
                                 tokenizer=config.tokenizer, warmup=config.warmup,
                                 max_concurrency=config.max_concurrency, seed=config.seed),
                          **WORKLOADS[workload], **config.overrides})


# --- one server's process ------------------------------------------------------------------
def _get_status(url: str) -> Optional[int]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until /v1/models answers 200 and /health 200 (or 404: none); raises when the process
    exits first (RuntimeError) or the deadline passes (TimeoutError)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before answering")
        if _get_status(base_url + "/v1/models") == 200 and _get_status(base_url + "/health") in (200, 404):
            return time.monotonic() - started
        time.sleep(1.0)
    raise TimeoutError(f"{base_url}/v1/models did not answer within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, grace_s: float) -> dict:
    """SIGINT the process group (as Ctrl-C does), then SIGTERM, then SIGKILL; the exit code and how."""
    started, sent = time.monotonic(), []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None and not _group_alive(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        sent.append(sig.name)
        deadline = time.monotonic() + (grace_s if sig != signal.SIGKILL else 10.0)
        while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
            time.sleep(0.2)
    proc.poll()
    return {"exit_code": proc.returncode, "signals": sent, "stop_s": round(time.monotonic() - started, 2),
            "clean": sent == ["SIGINT"] and proc.returncode is not None}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_server(config: DriverConfig, spec: ServerSpec) -> dict:
    """Start, measure every workload, stop; the server's result (an "error" instead of hanging)."""
    from baton.bench.serving.runner import run_benchmark
    from baton.services.common.server import free_port
    port = config.port or (free_port(config.host) if "{port}" in spec.command else DEFAULT_PORT)
    command = spec.command.replace("{port}", str(port))
    base_url = f"http://{config.host}:{port}"
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{spec.name}.log"
    result: dict = {"name": spec.name, "command": command, "base_url": base_url, "log": str(log_path),
                    "ready_s": None, "error": None, "stop": None, "workloads": {}}
    print(f"gpu_serving: starting {spec.name}: {command}", file=sys.stderr, flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            result["ready_s"] = round(wait_ready(base_url, proc, config.ready_timeout_s), 2)
            for workload in config.workloads:
                bench = bench_config(config, workload, base_url)
                doc = asyncio.run(run_benchmark(bench, command=f"gpu_serving {spec.name} {workload}"))
                if not config.keep_requests:
                    for run in doc["runs"]:
                        run.pop("requests", None)
                result["workloads"][workload] = doc
        except Exception as error:  # noqa: BLE001 - reported in the result, the next server still runs
            result["error"] = f"{type(error).__name__}: {error}"
        finally:
            result["stop"] = stop_server(proc, config.stop_grace_s)
    if result["error"]:
        result["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return result


# --- tables ---------------------------------------------------------------------------------
COLUMNS = ("server", "workload", "rate", "goodput (req/s)", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
           "ITL p50", "ITL p99", "failed", "chunks >1 tok", "reads >1 chunk")


def _f(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def _pct(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def table_rows(result: dict) -> list[list[str]]:
    """One row per (workload, rate) of a server's result (or one row with its error)."""
    if result.get("error") and not result["workloads"]:
        return [[result["name"], "-", "-", f"error: {result['error'][:80]}", *["-"] * (len(COLUMNS) - 4)]]
    rows = []
    for workload, doc in result["workloads"].items():
        for run in doc["runs"]:
            c = run["coalescing"]
            rows.append([result["name"], workload, str(run["request_rate"]), _f(run["goodput"], 2),
                         _f(run["request_throughput"], 2), _f(run["output_throughput"], 0),
                         _f(run["ttft_ms"]["median"]), _f(run["ttft_ms"]["p99"]), _f(run["itl_ms"]["median"], 2),
                         _f(run["itl_ms"]["p99"], 2), f"{run['failed']}/{run['num_requests']}",
                         _pct(c["multi_token_chunk_fraction"]), _pct(c["multi_chunk_read_fraction"])])
    return rows


def markdown_table(results: Sequence[dict], slo: str = DEFAULT_SLO) -> str:
    """The comparison table of `results` (latencies in ms; goodput under `slo`)."""
    lines = [f"Goodput SLO: {slo.replace(',', ', ')} (ms). Latencies in ms; ITL per token.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for result in results for row in table_rows(result)]
    for result in results:
        stop = result.get("stop") or {}
        tokenizers = {doc["server"].get("tokenizer_source") for doc in result["workloads"].values()}
        lines.append(f"\n- {result['name']}: `{result['command']}`; ready in {_f(result.get('ready_s'))} s; "
                     f"prompts from {', '.join(sorted(t for t in tokenizers if t)) or 'n/a'}; stopped with "
                     f"{'/'.join(stop.get('signals', [])) or 'nothing'} (exit {stop.get('exit_code')})"
                     + (f"; error: {result['error']}" if result.get("error") else ""))
    return "\n".join(lines) + "\n"


def _gpus() -> Optional[str]:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure every server; 0 when each one completed requests in every workload."""
    config = parse_args(argv)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in config.servers:
        result = run_server(config, spec)
        result.update(created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      gpus=_gpus(), argv=shlex.join(sys.argv[1:] if argv is None else list(argv)),
                      driver={k: v for k, v in dataclasses.asdict(config).items() if k != "servers"})
        write_json(str(out / f"{spec.name}.json"), result)
        (out / f"{spec.name}.md").write_text(markdown_table([result], config.slo), encoding="utf-8")
        results.append(result)
    summary = markdown_table(results, config.slo)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary, flush=True)
    ok = all(not r["error"] and all(any(run["completed"] for run in doc["runs"]) for doc in r["workloads"].values())
             for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

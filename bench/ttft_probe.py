"""Where a request's time to first token goes, layer by layer, at no load.

Sends the same kind of request, one at a time, to each layer of a running Baton cluster
that the command names, and to a peer's HTTP server for reference:
  decode  baton.v1.Decode/Generate on a decode worker (engine + worker shell only)
  router  baton.v1.Router/Generate on the router (adds the router core and one gRPC hop)
  http    POST /v1/completions, streaming, on the gateway (adds HTTP, JSON and SSE)
  peer    the same HTTP request to another server (e.g. `vllm serve`)
Every prompt is fresh random token ids (no prefix-cache hit), `--prompt-tokens` long, with
`max_tokens` 2 and `ignore_eos`; TTFT is the time from sending to the first streamed token.
The differences of the medians between layers are what each layer adds.

    python3 -m baton.bench.ttft_probe --decode 127.0.0.1:50051 --router 127.0.0.1:50052 \
        --http http://127.0.0.1:8000 --peer http://127.0.0.1:8001 --prompt-tokens 128,1024
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m baton.bench.ttft_probe", description=__doc__.split("\n")[0])
    p.add_argument("--decode", default="", help="host:port of a decode worker's gRPC server")
    p.add_argument("--router", default="", help="host:port of the router's gRPC server")
    p.add_argument("--http", default="", help="base URL of the Baton gateway")
    p.add_argument("--peer", default="", help="base URL of a peer's OpenAI-compatible server")
    p.add_argument("--model", default="", help="model name for HTTP requests (default: the first /v1/models lists)")
    p.add_argument("--prompt-tokens", default="128,1024", help="prompt lengths, comma-separated")
    p.add_argument("--requests", type=int, default=20, help="requests per layer and length (after 3 warm-ups)")
    p.add_argument("--vocab", type=int, default=32000, help="token ids are drawn from [100, vocab)")
    p.add_argument("--json", default="", help="also write the rows here")
    return p.parse_args(argv)


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


async def _grpc_ttft(kind: str, address: str, prompt: list[int]) -> float:
    import grpc

    from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

    params = common_pb2.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        if kind == "decode":
            call = worker_pb2_grpc.DecodeStub(channel).Generate(
                worker_pb2.DecodeRequest(prompt_token_ids=prompt, params=params), timeout=60)
        else:
            call = router_pb2_grpc.RouterStub(channel).Generate(
                router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params), timeout=60)
        start = time.perf_counter()
        first = None
        async for chunk in call:
            if first is None and chunk.token_ids:
                first = time.perf_counter() - start
        if first is None:
            raise RuntimeError(f"{kind} at {address} streamed no token")
        return first


def _model(base: str) -> str:
    with urllib.request.urlopen(base.rstrip("/") + "/v1/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def _http_ttft(base: str, model: str, prompt: list[int]) -> float:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(base.rstrip("/") + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp:
            if first is None and line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"]
                if choice and choice[0].get("text") is not None:
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{base} streamed no token")
    return first


def measure(layer: str, target: str, n_tokens: int, args, rng: random.Random, model: str) -> dict:
    samples = []
    for i in range(args.requests + 3):
        prompt = _prompt(rng, n_tokens, args.vocab)
        if layer in ("decode", "router"):
            t = asyncio.run(_grpc_ttft(layer, target, prompt))
        else:
            t = _http_ttft(target, model, prompt)
        if i >= 3:
            samples.append(1000.0 * t)
    return {"layer": layer, "prompt_tokens": n_tokens, "requests": len(samples),
            "p50_ms": statistics.median(samples), "mean_ms": statistics.fmean(samples), "min_ms": min(samples)}


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    layers = [(name, target) for name, target in (("decode", args.decode), ("router", args.router),
                                                   ("http", args.http), ("peer", args.peer)) if target]
    if not layers:
        sys.exit("name at least one of --decode, --router, --http, --peer")
    models = {t: (args.model or _model(t)) for name, t in layers if name in ("http", "peer")}
    rng = random.Random(0)
    rows = [measure(name, target, int(n), args, rng, models.get(target, ""))
            for n in args.prompt_tokens.split(",") for name, target in layers]
    print("| prompt tokens | layer | TTFT p50 ms | mean ms | min ms | p50 added by this layer ms |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sorted({r["prompt_tokens"] for r in rows}):
        below = None
        for r in (r for r in rows if r["prompt_tokens"] == n):
            added = "" if below is None or r["layer"] == "peer" else f"{r['p50_ms'] - below:.2f}"
            print(f"| {n} | {r['layer']} | {r['p50_ms']:.2f} | {r['mean_ms']:.2f} | {r['min_ms']:.2f} | {added} |")
            if r["layer"] != "peer":
                below = r["p50_ms"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

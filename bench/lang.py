"""Frontend-language benchmark: a few-shot-plus-fork program through `run_batch`, against the
same prompts sent as independent OpenAI requests with no shared-prefix reuse.

The program (text mode): a few-shot prefix (the same for every input) + one input, then
`fork(4)`: each branch asks one question about the input and generates greedily (at most
`--max-tokens`, stopping at a newline). `run_batch` runs `--inputs` programs, `--threads` at a
time. The baseline sends each branch's exact prompt (prefix + input + question) as its own
`/v1/completions` request (official openai client, `--threads` x 4 in flight, the program's
greatest concurrency) to a cluster started with `--disable-radix-cache`: nothing is reused.

Each side gets its own `baton up` (embedded SmolLM2 unless `--model`; the same flags but the
cache), started and stopped here in the same run. Reported per side: wall time, programs/s,
branch requests/s, output tokens/s, the cached-token share of the branch prompts (usage
`cached_tokens` / `prompt_tokens`) and the router-exported prefix-cache counters; the ratio is
program throughput (lang) / (baseline); the greedy outputs of both sides are compared.

    .venv/bin/python -m baton.bench.lang                       # 200 inputs, CPU, ~5 min on 2 cores
    .venv/bin/python -m baton.bench.lang --inputs 16 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import baton
from baton.services.common.server import free_port

FEW_SHOT = "".join(
    f"Item: {item}\nCategory: {cat}\nColor: {color}\nUse: {use}\nOrigin: {origin}\n\n"
    for item, cat, color, use, origin in [
        ("banana", "fruit", "yellow", "eaten raw or baked", "tropical Asia"),
        ("hammer", "tool", "grey and brown", "driving nails", "prehistoric workshops"),
        ("violin", "instrument", "brown", "playing classical music", "16th-century Italy"),
        ("spinach", "vegetable", "green", "salads and cooking", "ancient Persia"),
        ("bicycle", "vehicle", "any color", "riding short distances", "19th-century Europe"),
        ("teapot", "kitchenware", "white porcelain", "brewing tea", "Yuan dynasty China"),
    ])
QUESTIONS = ("Category", "Color", "Use", "Origin")
ITEMS = ["apple", "saw", "flute", "carrot", "scooter", "frying pan", "mango", "wrench", "drum", "onion",
         "canoe", "kettle", "cherry", "chisel", "harp", "potato", "tram", "ladle", "lemon", "pliers"]


@dataclass
class Side:
    """One side's figures."""

    name: str
    seconds: float
    programs: int
    requests: int
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    server_matched: float
    server_looked_up: float

    @property
    def programs_per_s(self) -> float:
        return self.programs / self.seconds

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / max(1, self.prompt_tokens)


def inputs(count: int) -> list[str]:
    """`count` distinct inputs (items, numbered past the first round)."""
    return [ITEMS[i % len(ITEMS)] + ("" if i < len(ITEMS) else f" model {i // len(ITEMS)}") for i in range(count)]


def branch_prompt(item: str, question: str) -> str:
    return f"{FEW_SHOT}Item: {item}\n{question}:"


@baton.function
def describe(s, item, max_tokens):
    s += FEW_SHOT + "Item: " + item + "\n"
    forks = s.fork(len(QUESTIONS))
    for fork, question in zip(forks, QUESTIONS):
        fork += question + ":" + baton.gen("answer", max_tokens=max_tokens, stop="\n")
    forks.join()
    s.set_var("answers", [f["answer"] for f in forks])
    s.set_var("usage", [f.get_meta_info("answer") for f in forks])


def _counters(url: str) -> tuple[float, float]:
    import httpx
    text = httpx.get(url + "/metrics", timeout=10).text
    total = {"matched": 0.0, "looked_up": 0.0}
    for line in text.splitlines():
        for key in total:
            if line.startswith(f"baton_router_worker_prefix_tokens_{key}_total"):
                total[key] += float(line.rsplit(" ", 1)[1])
    return total["matched"], total["looked_up"]


def _settled_counters(url: str, quiet_s: float = 1.2, limit_s: float = 10.0) -> tuple[float, float]:
    """`_counters` once they have stopped moving: the router re-exports the workers' counters
    from their load reports (one per health interval), so a scrape right after a run can lag."""
    start = time.monotonic()
    last, since = _counters(url), time.monotonic()
    while time.monotonic() - start < limit_s:
        time.sleep(0.3)
        now = _counters(url)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def run_lang(url: str, items: list[str], threads: int, max_tokens: int) -> tuple[Side, list[list[str]]]:
    """The program over every input; (figures, answers per input)."""
    backend = baton.RuntimeEndpoint(url)
    before = _settled_counters(url)
    start = time.perf_counter()
    states = describe.run_batch([{"item": i, "max_tokens": max_tokens} for i in items], backend=backend,
                                num_threads=threads, temperature=0.0)
    seconds = time.perf_counter() - start
    after = _settled_counters(url)
    failed = [s.error() for s in states if s.error() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} programs failed; first: {failed[0]}")
    usage = [u for s in states for u in s["usage"]]
    side = Side("lang (run_batch, fork 4, radix cache)", seconds, len(items), len(usage),
                sum(u["completion_tokens"] for u in usage), sum(u["prompt_tokens"] for u in usage),
                sum(u["cached_tokens"] for u in usage), after[0] - before[0], after[1] - before[1])
    return side, [s["answers"] for s in states]


def run_openai(url: str, items: list[str], threads: int, max_tokens: int) -> tuple[Side, list[list[str]]]:
    """Every branch prompt as its own completions request; (figures, answers per input)."""
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    prompts = [branch_prompt(item, q) for item in items for q in QUESTIONS]
    before = _settled_counters(url)

    def one(prompt: str):
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         stop=["\n"])
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads * len(QUESTIONS)) as pool:
        replies = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    after = _settled_counters(url)
    usage = [r.usage for r in replies]
    side = Side("independent requests (no prefix reuse)", seconds, len(items), len(replies),
                sum(u.completion_tokens for u in usage), sum(u.prompt_tokens for u in usage),
                sum(u.prompt_tokens_details.cached_tokens for u in usage), after[0] - before[0], after[1] - before[1])
    texts = [r.choices[0].text for r in replies]
    return side, [texts[i:i + len(QUESTIONS)] for i in range(0, len(texts), len(QUESTIONS))]


class Cluster:
    """A `baton up` of this run (stopped with SIGINT)."""

    def __init__(self, extra: list[str], folder: Path, timeout_s: float = 300.0) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = folder / f"up-{port}.log"
        self.args = ["up", "--port", str(port), *extra]
        self.proc = subprocess.Popen([sys.executable, "-m", "baton.deploy.cli", *self.args],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while "Baton is up" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"baton up did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def report(lang: Side, base: Side, same: int, total: int, command: str, machine: str, flags: list[str]) -> str:
    """The RESULTS.md section."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for side in (lang, base):
        rows.append(f"| {side.name} | {side.seconds:.1f} | {side.programs_per_s:.2f} | {side.requests / side.seconds:.2f}"
                    f" | {side.output_tokens / side.seconds:.1f} | {side.cached_share:.1%} | "
                    f"{side.server_matched:.0f} / {side.server_looked_up:.0f} |")
    ratio = lang.programs_per_s / base.programs_per_s
    return "\n".join([
        f"## Frontend language: few-shot + fork(4) through run_batch vs independent requests ({date})", "",
        f"- Command: `{command}`", f"- Machine: {machine}", f"- Date: {date}",
        f"- Workload: {lang.programs} inputs; a {len(FEW_SHOT)}-character few-shot prefix shared by every input, then "
        f"fork(4), one question per branch, greedy, stop at newline; both sides on their own `baton up {' '.join(flags)}` "
        "(the baseline's with `--disable-radix-cache`), started in this run; the baseline sends every branch prompt as "
        "its own /v1/completions request with the program's greatest concurrency", "",
        "| side | seconds | programs/s | branch requests/s | output tokens/s | cached share of branch prompts | "
        "server prefix tokens matched / looked up |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Ratio (programs/s, lang / baseline): **{ratio:.2f}x**. Greedy branch outputs equal on both sides: "
        f"{same}/{total}.", ""])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=200, help="programs (inputs) to run")
    parser.add_argument("--threads", type=int, default=16, help="programs in flight at once")
    parser.add_argument("--max-tokens", type=int, default=12, help="most tokens per branch answer")
    parser.add_argument("--up-flags", default="--kv-cache-tokens 65536",
                        help="extra `baton up` flags for both clusters (e.g. --model PATH)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.inputs < 1 or args.threads < 1 or args.max_tokens < 1:
        parser.error("--inputs, --threads and --max-tokens must be positive")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    flags = shlex.split(args.up_flags)
    items = inputs(args.inputs)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(flags, Path(tmp))
        try:
            lang, lang_answers = run_lang(cluster.url, items, args.threads, args.max_tokens)
        finally:
            cluster.stop()
        cluster = Cluster([*flags, "--disable-radix-cache"], Path(tmp))
        try:
            base, base_answers = run_openai(cluster.url, items, args.threads, args.max_tokens)
        finally:
            cluster.stop()
    same = sum(a == b for x, y in zip(lang_answers, base_answers) for a, b in zip(x, y))
    from baton.bench.machine import describe_machine
    command = "python3 -m baton.bench.lang " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(report(lang, base, same, len(items) * len(QUESTIONS), command.strip(), describe_machine(), flags))
    if args.json:
        Path(args.json).write_text(json.dumps({"lang": asdict(lang), "baseline": asdict(base), "same_outputs": same,
                                               "ratio": lang.programs_per_s / base.programs_per_s}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared-prefix workload of `bench/router_scale.py`: many groups, multi-turn, against
the real router core in front of N simulated decode workers, one routing policy at a time.

Workload: `groups` groups, each with a system prompt of `system_len` random tokens and
`users` conversations; a conversation's turn t is the system prompt, then every earlier
turn's user message and answer, then a new user message of `user_len` tokens. Closed loop:
`concurrency` clients; each repeatedly takes a random idle conversation and sends its next
turn (after `turns` turns the conversation starts over at turn 0). Answers are the simulated
workers' deterministic tokens, so the next turn's prompt is known.

Measured per run: requests completed per second, TTFT p50 / p99 at the client (the router
core's `generate`), and the prefix hit rate (cached prompt tokens reported by the workers /
prompt tokens) against the best possible for the requests as they ran: for each request,
the whole pages of its prompt found among the prompts sent before it and the answers
received before it was sent: what one infinite cache with perfect routing could hit, a
request whose prefix is still being prefilled waiting for that prefill (an upper bound; the
simulated worker, like a real engine's scheduler, matches its cache when a request's
prefill starts and lets a request wait for a prefill of its prefix running on the same
worker, so this is reachable by routing that sends it there: the router's pending blocks).
The *no-wait* best (the bench's "attainable best" column) counts only the pages of prompts
whose first token had come back before the request was sent (their prefill done), and of
the answers received: what a worker that matches its cache on arrival and never waits could
hit (the simulated worker before 2026-12-01 evening). Hits can now exceed it: a ratio above
1 in "hit / attainable" is the requests that waited for a prefill of their prefix.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

from baton.protos.baton.v1 import common_pb2
from baton.protos.block_hash import block_hashes
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.types import RouterRequest
from baton.services.sim.tokens import expected_tokens

WIDE_GUARD = 32768.0
"""A cache-aware load-balance guard 8x the default, to show what the guard costs (before the guard
counted a decode worker's requests rather than its context tokens, the default fired most of the
time on this workload)."""
POLICIES = {
    "round_robin": (dict(decode_policy="round_robin", kv_events=False), 1),
    "min_load": (dict(decode_policy="min_load", kv_events=False), 1),
    "cache_aware approximate": (dict(decode_policy="cache_aware", kv_events=False), 1),
    "cache_aware precise (KV events)": (dict(decode_policy="cache_aware", kv_events=True), 1),
    "cache_aware approximate, wide guard": (dict(decode_policy="cache_aware", kv_events=False,
                                                 balance_abs_threshold=WIDE_GUARD), 1),
    "cache_aware precise (KV events), wide guard": (dict(decode_policy="cache_aware", kv_events=True,
                                                         balance_abs_threshold=WIDE_GUARD), 1),
    "cache_aware approximate, 2 replicas": (dict(decode_policy="cache_aware", kv_events=False), 2),
    "cache_aware precise (KV events), 2 replicas": (dict(decode_policy="cache_aware", kv_events=True), 2),
}
"""Name -> (router config, router replicas). With 2 replicas the clients alternate between two
router cores in front of the same workers (as two pods behind one Service)."""


@dataclass(frozen=True)
class PrefixWorkload:
    """The shape of the shared-prefix workload."""

    groups: int = 64
    users: int = 4
    turns: int = 4
    system_len: int = 1024
    user_len: int = 64
    output_len: int = 8
    concurrency: int = 32
    duration_s: float = 8.0
    block_size: int = 16
    seed: int = 0


@dataclass
class RunResult:
    policy: str
    workers: int
    requests: int
    req_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    hit_rate: float
    best_hit_rate: float
    attainable_hit_rate: float = 0.0
    """The best hit rate counting only pages prefilled before each request was sent (no request
    waits for a prefill in flight; hits may exceed it, see the module docstring)."""


class Conversations:
    """Every conversation's next prompt, and the best-possible cache over completed contexts."""

    def __init__(self, load: PrefixWorkload) -> None:
        rng = random.Random(load.seed)
        self.load = load
        self.systems = [[rng.randrange(32000) for _ in range(load.system_len)] for _ in range(load.groups)]
        self.history = {(g, u): [] for g in range(load.groups) for u in range(load.users)}
        self.turn = {key: 0 for key in self.history}
        self.busy: set = set()
        self.rng = rng
        self.seen: set[int] = set()
        self.ready: set[int] = set()
        """Pages whose prefill finished (first token received) or that were answered."""

    def take(self):
        """(conversation, prompt) of a random idle conversation."""
        while True:
            key = self.rng.choice(list(self.history))
            if key not in self.busy:
                break
        self.busy.add(key)
        if self.turn[key] == 0:
            self.history[key] = []
        user = [self.rng.randrange(32000) for _ in range(self.load.user_len)]
        return key, self.systems[key[0]] + self.history[key] + user

    def best_cached(self, prompt: list[int]) -> tuple[int, int]:
        """The best possible and the no-wait ("attainable") cached prefix of a prompt being sent
        now (which then joins the cache)."""
        hashes = block_hashes(prompt, self.load.block_size)
        best = next((i for i, h in enumerate(hashes) if h not in self.seen), len(hashes))
        attainable = next((i for i, h in enumerate(hashes) if h not in self.ready), len(hashes))
        self.seen.update(hashes)
        return best * self.load.block_size, attainable * self.load.block_size

    def prefilled(self, prompt: list[int]) -> None:
        """The prompt's first token came back: its pages are computed."""
        self.ready.update(block_hashes(prompt, self.load.block_size))

    def done(self, key, prompt: list[int], answer: list[int]) -> None:
        self.seen.update(block_hashes(prompt + answer, self.load.block_size))
        self.ready.update(block_hashes(prompt + answer, self.load.block_size))
        self.history[key] = prompt[self.load.system_len:] + answer
        self.turn[key] = (self.turn[key] + 1) % self.load.turns
        self.busy.discard(key)


async def run_policy(policy: str, addresses: list[str], load: PrefixWorkload) -> RunResult:
    """One closed-loop run of the workload under `policy` (fresh workers expected)."""
    flags, replicas = POLICIES[policy]
    config = RouterConfig(decode=",".join(addresses), decode_only_threshold=10 ** 9, health_interval_s=1.0,
                          health_timeout_s=5.0, max_queued_requests=100_000, **flags)
    cores = [RouterCore(config) for _ in range(replicas)]
    for core in cores:
        await core.start()
        await core.registry.wait_first_check(30)
        if core.kv_events is not None:
            await core.kv_events.wait_ready(30)
    talks = Conversations(load)
    ttfts: list[float] = []
    totals = {"prompt": 0, "cached": 0, "best": 0, "attainable": 0, "requests": 0}
    stop_at = time.monotonic() + load.duration_s
    counter = [0]

    async def client(core: RouterCore) -> None:
        while time.monotonic() < stop_at:
            key, prompt = talks.take()
            best, attainable = talks.best_cached(prompt)
            counter[0] += 1
            sent = time.monotonic()
            first, answer, usage = None, [], None
            async for chunk in core.generate(RouterRequest(f"r{counter[0]}", prompt, common_pb2.SamplingParams(
                    max_tokens=load.output_len), timeout_s=120)):
                if first is None:
                    first = time.monotonic() - sent
                    talks.prefilled(prompt)
                answer += chunk.token_ids
                usage = chunk.usage or usage
            assert answer == expected_tokens(prompt, load.output_len), "a stream lost or repeated a token"
            talks.done(key, prompt, answer)
            ttfts.append(first)
            totals["prompt"] += len(prompt)
            totals["cached"] += usage.cached_tokens
            totals["best"] += best
            totals["attainable"] += attainable
            totals["requests"] += 1

    started = time.monotonic()
    await asyncio.gather(*(client(cores[i % replicas]) for i in range(load.concurrency)))
    elapsed = time.monotonic() - started
    for core in cores:
        await core.stop()
    ttfts.sort()
    return RunResult(policy=policy, workers=len(addresses), requests=totals["requests"],
                     req_per_s=totals["requests"] / elapsed,
                     ttft_p50_ms=statistics.median(ttfts) * 1000,
                     ttft_p99_ms=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000,
                     hit_rate=totals["cached"] / max(1, totals["prompt"]),
                     best_hit_rate=totals["best"] / max(1, totals["prompt"]),
                     attainable_hit_rate=totals["attainable"] / max(1, totals["prompt"]))

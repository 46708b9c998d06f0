"""Host time of one `RadixCache.evict` call as a function of the number of cached prompts.

Steady serving keeps the KV pool full of cached prefixes, so every admitted request that needs
blocks evicts a few. This bench fills a bare cache (no model) with N prompts of --pages pages
each; prompts come in groups of --group sharing a first page (a system prompt), so the tree
has inner nodes as well as leaves. Each repetition then times one `evict(--evict-blocks)` on the
full cache (the least recently used prompts go), re-inserts as many fresh prompts as were
evicted (untimed) and touches a random cached prompt with `match_prefix` (untimed), so the tree
size stays N and the LRU order keeps changing. Prints the median and p90 of the evict call (us)
per N, and the load average (the machine may be shared: compare rows of one run).

    .venv/bin/python -m baton.bench.radix_evict_cpu                       # N in 100,1000,5000,20000
    .venv/bin/python -m baton.bench.radix_evict_cpu --prompts 100,1000 --reps 500
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import Optional, Sequence

from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.radix_cache import RadixCache


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default="100,1000,5000,20000", help="comma-separated cached prompt counts N")
    p.add_argument("--pages", type=int, default=4, help="pages per prompt")
    p.add_argument("--page-size", type=int, default=16, help="tokens per page")
    p.add_argument("--group", type=int, default=8, help="prompts sharing a first page")
    p.add_argument("--evict-blocks", type=int, default=4, help="blocks asked of each evict call")
    p.add_argument("--reps", type=int, default=300, help="timed evict calls per N")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p.parse_args(argv)


class Filler:
    """Makes distinct prompts and inserts them as finished requests do."""

    def __init__(self, cache: RadixCache, args: argparse.Namespace) -> None:
        self.cache, self.args, self.count = cache, args, 0
        self.prompts: list[list[int]] = []

    def add(self) -> None:
        page, i = self.args.page_size, self.count
        self.count += 1
        group = i // self.args.group
        tokens = [1_000_000 + group] * page + [i * 16 + j for j in range(page * (self.args.pages - 1))]
        match = self.cache.match_prefix(tokens, count=False)
        blocks = list(match.blocks) + self.cache.pool.allocate(self.args.pages - match.num_blocks)
        self.cache.pool.share(match.blocks)
        self.cache.insert(tokens, blocks)
        self.cache.pool.release(blocks)
        self.prompts.append(tokens)


def measure(n: int, args: argparse.Namespace) -> tuple[float, float]:
    rng = random.Random(args.seed)
    pool = BlockPool(n * args.pages + 4 * args.evict_blocks + 64)
    cache = RadixCache(pool, args.page_size)
    filler = Filler(cache, args)
    for _ in range(n):
        filler.add()
    times, target = [], cache.cached_blocks
    for _ in range(args.reps):
        t0 = time.perf_counter()
        cache.evict(args.evict_blocks)
        times.append((time.perf_counter() - t0) * 1e6)
        while cache.cached_blocks < target:
            filler.add()
        cache.match_prefix(rng.choice(filler.prompts[-n:]), count=False)
    cache.check_integrity()
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main(argv: Optional[Sequence[str]] = None) -> list[tuple[int, float, float]]:
    args = parse_args(argv)
    rows = []
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"{'prompts':>8} {'evict p50 us':>13} {'p90 us':>8}")
    for n in (int(x) for x in args.prompts.split(",")):
        p50, p90 = measure(n, args)
        rows.append((n, p50, p90))
        print(f"{n:>8} {p50:>13.1f} {p90:>8.1f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    return rows


if __name__ == "__main__":
    main()

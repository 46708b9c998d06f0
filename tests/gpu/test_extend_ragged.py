"""The Triton extend kernel on ragged batches against float64: many sequences in one launch,
each with its own cached prefix (0 to several thousand tokens) and its own count of new tokens
(1 to about a thousand), on blocks placed at random in a paged cache, with no padding.

Shapes are the serving ones (Llama-3.1-8B's 32 query / 8 KV heads of 128, Qwen2.5-7B's group of
7, head dim 64 in fp32); lengths include the tile edges (BLOCK_M, BLOCK_M + 1, a page multiple,
a page minus one). Every case fills the output with NaN first, so a row no tile wrote fails,
and checks that the work list holds exactly ceil(new tokens / BLOCK_M) tiles per sequence
(no padded tiles). The last test runs a ragged mixed step through `TritonAttentionBackend`
(prepare + attend) as the engine does. Tolerances as in test_attention_kernels: relative
error 1e-2 in bf16 / fp16, 1e-4 in fp32.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine.attention.triton_kernels import (  # noqa: E402
    extend_attention, extend_blocks, extend_tiles)
from tests.gpu.test_attention_kernels import TOLERANCE, random_block_tables, reference, rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def ragged_lengths(rng: random.Random, batch: int, longest_new: int, longest_prefix: int, page: int,
                   block_m: int) -> tuple[list[int], list[int]]:
    """(new tokens, prefix lens): mostly random, with the edge cases in front."""
    edges = [(1, 0), (block_m, 0), (block_m + 1, page - 1), (2, page * 3), (longest_new, longest_prefix),
             (block_m - 1, 1), (1, longest_prefix)]
    q_lens, prefixes = [], []
    for i in range(batch):
        if i < len(edges):
            n, p = edges[i]
        else:
            n = rng.randint(1, 8) if rng.random() < 0.3 else rng.randint(9, longest_new)
            p = 0 if rng.random() < 0.2 else rng.randint(1, longest_prefix)
        q_lens.append(max(1, min(n, longest_new)))
        prefixes.append(p)
    order = list(range(batch))
    rng.shuffle(order)  # edge cases anywhere in the launch, not only first
    return [q_lens[i] for i in order], [prefixes[i] for i in order]


def paged_cache(ctx_lens: list[int], kv_heads: int, head_dim: int, page: int, dtype: torch.dtype, seed: int):
    """Random K/V over the whole cache (made on the device: large), each sequence on random
    blocks with spare blocks between; (k, v, tables as lists, int32 block table)."""
    tables, table, total = random_block_tables(ctx_lens, page, 17, torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (total * page, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    return k, v, tables, table.to(DEVICE)


def run_ragged(q_lens, prefixes, group, kv_heads, head_dim, page, dtype, window, seed) -> float:
    k, v, tables, table = paged_cache([p + n for p, n in zip(prefixes, q_lens)], kv_heads, head_dim, page, dtype,
                                      seed)
    heads = group * kv_heads
    tokens = sum(q_lens)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    q = torch.randn(tokens, heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    block_m = extend_blocks(head_dim, dtype)[0]
    tiles = extend_tiles(q_lens, block_m, prefixes)
    assert len(tiles) // 2 == sum(math.ceil(n / block_m) for n in q_lens), "padded tiles in the work list"
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    out = torch.full((tokens, heads * head_dim), float("nan"), dtype=dtype, device=DEVICE)
    scale = head_dim ** -0.5
    extend_attention(q, k, v, table, as_int(starts), as_int(q_lens), as_int(prefixes), page, scale,
                     tiles=as_int(tiles), out=out, sliding_window=window)
    ref = reference(q, k, v, tables, page, list(zip(starts, q_lens, prefixes)), window, scale)
    return rel_error(out, ref, torch.arange(tokens, device=DEVICE))


# batch, longest new, longest prefix, GQA group, KV heads, head dim, page, dtype, window
RAGGED_CASES = [
    (48, 1000, 6000, 4, 8, 128, 16, BF16, None),   # Llama-3.1-8B heads
    (96, 300, 2000, 4, 8, 128, 1, BF16, None),     # page 1: every token on its own block
    (32, 600, 3000, 7, 4, 128, 64, BF16, None),    # Qwen2.5-7B's group of 7
    (40, 400, 1500, 2, 2, 64, 16, FP32, None),     # IEEE fp32
    (24, 500, 2500, 4, 2, 128, 16, FP16, None),
    (32, 400, 2000, 4, 8, 128, 16, BF16, 700),     # sliding window across the prefix / new boundary
]


@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda c: "b{}_q{}_p{}_g{}_kv{}_d{}_pg{}_{}_w{}".format(
    *c[:7], str(c[7]).removeprefix("torch."), c[8]))
def test_ragged_extend_matches_float64(case):
    batch, longest_new, longest_prefix, group, kv_heads, head_dim, page, dtype, window = case
    block_m = extend_blocks(head_dim, dtype)[0]
    for seed in (0, 1):
        q_lens, prefixes = ragged_lengths(random.Random(seed), batch, longest_new, longest_prefix, page, block_m)
        err = run_ragged(q_lens, prefixes, group, kv_heads, head_dim, page, dtype, window, seed)
        assert err < TOLERANCE[dtype], f"relative error {err:.2e} (seed {seed})"


def test_ragged_mixed_step_through_the_backend():
    """A mixed step as the engine builds it: decodes and ragged chunks, block tables per sequence."""
    from baton.services.engine.attention.base import AttentionMetadata, SequenceSlice
    from baton.services.engine.attention.triton_backend import TritonAttentionBackend
    from baton.services.engine.kv.kv_cache import KVCache, KVLayout

    rng = random.Random(5)
    page, kv_heads, heads, head_dim, dtype = 16, 8, 32, 128, BF16
    q_lens = [1 if i % 3 == 0 else rng.randint(2, 700) for i in range(40)]
    prefixes = [rng.randint(0, 4000) for _ in q_lens]
    ctx = [p + n for p, n in zip(prefixes, q_lens)]
    needed = [math.ceil(c / page) for c in ctx]
    layout = KVLayout(1, sum(needed) + 9, page, kv_heads, head_dim, dtype)
    cache = KVCache(layout, torch.device(DEVICE))
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=gen, device=DEVICE))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=gen, device=DEVICE))
    order = torch.randperm(layout.num_blocks, generator=torch.Generator().manual_seed(7)).tolist()
    tables, seqs, slots, used, start = [], [], [], 0, 0
    for n, p, blocks in zip(q_lens, prefixes, needed):
        table = order[used:used + blocks]
        used += blocks
        tables.append(table)
        seqs.append(SequenceSlice(start, n, p))
        slots += [table[pos // page] * page + pos % page for pos in range(p, p + n)]
        start += n
    tokens = start
    q = torch.randn(tokens, heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    meta = AttentionMetadata(seqs=seqs, slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=tables,
                             page_size=page)
    backend = TritonAttentionBackend(cache, heads, head_dim)
    backend.prepare(meta)
    extend_lens = [n for n in q_lens if n > 1]
    assert meta.plan.extend.tiles.numel() // 2 == sum(math.ceil(n / backend.block_m) for n in extend_lens)
    out = torch.full((tokens, heads * head_dim), float("nan"), dtype=dtype, device=DEVICE)
    backend.attend(0, q, meta, out=out)
    starts = [s.query_start for s in seqs]
    ref = reference(q, cache.keys[0], cache.values[0], tables, page, list(zip(starts, q_lens, prefixes)), None,
                    head_dim ** -0.5)
    err = rel_error(out, ref, torch.arange(tokens, device=DEVICE))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"

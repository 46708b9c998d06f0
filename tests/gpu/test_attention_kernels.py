"""The Triton paged-attention kernels against a float64 reference on the same paged data.

Every case draws fresh random K/V (the whole cache, so a read of a slot outside a
sequence's context shows), scatters each sequence over random blocks, and fills the output
with NaN before the kernel runs, so an element the kernel forgets to write fails.
Relative error ||out - ref|| / ||ref|| must stay under 1e-2 in bf16 / fp16 and 1e-4 in fp32.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine.attention.triton_kernels import (  # noqa: E402
    decode_attention, extend_attention, extend_blocks, extend_tiles, num_decode_splits)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
MAX_ERRORS: dict[str, float] = {}
"""Largest relative error seen per (kernel, dtype), printed at the end of the session."""


def record(kernel: str, dtype: torch.dtype, err: float) -> None:
    key = f"{kernel}/{str(dtype).removeprefix('torch.')}"
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), err)


def random_block_tables(ctx_lens: list[int], page: int, spare: int, gen: torch.Generator):
    """Each sequence's blocks at random places among sum(blocks) + `spare` ones: (block lists, their int32
    block table padded with block 0, the number of blocks)."""
    needed = [max(1, math.ceil(n / page)) for n in ctx_lens]
    total = sum(needed) + spare
    order = torch.randperm(total, generator=gen).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n])
        used += n
    table = torch.zeros(len(ctx_lens), max(needed), dtype=torch.int32)
    for i, row in enumerate(tables):
        table[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return tables, table, total


def make_cache(ctx_lens: list[int], num_kv_heads: int, head_dim: int, page: int, dtype: torch.dtype,
               device: str, gen: torch.Generator):
    """Random K/V caches with every sequence on randomly placed blocks; its int32 block table."""
    tables, table, total = random_block_tables(ctx_lens, page, 3, gen)
    shape = (total * page, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype).to(device)
    v = torch.randn(shape, generator=gen).to(dtype).to(device)
    return k, v, tables, table.to(device)


def reference(q, k, v, tables, page, seqs, window, scale):
    """float64 attention: seqs = [(q_start, q_len, prefix_len)]; returns [T, Hq * D] (NaN elsewhere)."""
    tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    out = torch.full((tokens, num_heads * head_dim), float("nan"), dtype=torch.float64, device=q.device)
    for table, (start, q_len, prefix) in zip(tables, seqs):
        ctx = prefix + q_len
        pos = torch.arange(ctx, device=q.device)
        blocks = torch.tensor(table, device=q.device)[pos // page]
        slots = blocks * page + pos % page
        keys = k[slots].double().repeat_interleave(group, dim=1)
        vals = v[slots].double().repeat_interleave(group, dim=1)
        qs = q[start:start + q_len].double()
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        q_pos = (prefix + torch.arange(q_len, device=q.device))[:, None]
        visible = pos[None, :] <= q_pos
        if window:
            visible &= pos[None, :] > q_pos - window
        scores = scores.masked_fill(~visible[None], float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
        out[start:start + q_len] = o.reshape(q_len, -1)
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> float:
    got, want = out[rows].double(), ref[rows]
    assert torch.isfinite(got).all(), "the kernel left unwritten (NaN) or non-finite outputs"
    return ((got - want).norm() / want.norm()).item()


def random_lengths(rng: random.Random, batch: int, longest: int, page: int) -> list[int]:
    """Lengths in 1..longest, including the extremes and (when possible) a page multiple."""
    lens = [rng.randint(1, longest) for _ in range(batch)]
    lens[0] = longest
    if batch > 1:
        lens[1] = 1
    if batch > 2 and longest >= page:
        lens[2] = page * rng.randint(1, longest // page)
    return lens


def run_decode_case(batch, longest, group, kv_heads, head_dim, page, dtype, window, splits, seed=0,
                    device=DEVICE):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = random_lengths(rng, batch, longest, page)
    k, v, tables, table = make_cache(lens, kv_heads, head_dim, page, dtype, device, gen)
    heads = group * kv_heads
    tokens = batch + 3  # extra rows no sequence owns: they must stay untouched (NaN)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(device)
    rows = torch.randperm(tokens, generator=gen)[:batch]
    scale = head_dim ** -0.5
    if splits == "auto":
        splits = num_decode_splits(batch, kv_heads, min(longest, window or longest), 132)
    out = torch.full((tokens, heads * head_dim), float("nan"), dtype=dtype, device=device)
    decode_attention(q, k, v, table, torch.tensor(lens, dtype=torch.int32, device=device), page, scale,
                     q_rows=rows.to(torch.int32).to(device), out=out, sliding_window=window, num_splits=splits)
    seqs = [(int(r), 1, n - 1) for r, n in zip(rows, lens)]
    ref = reference(q, k, v, tables, page, seqs, window, scale)
    err = rel_error(out, ref, rows.to(device))
    untouched = torch.ones(tokens, dtype=torch.bool)
    untouched[rows] = False
    assert torch.isnan(out[untouched.to(device)]).all(), "the kernel wrote rows of no sequence"
    return err


def run_extend_case(q_lens, prefixes, group, kv_heads, head_dim, page, dtype, window, seed=0, use_tiles=True,
                    device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    ctx = [p + n for p, n in zip(prefixes, q_lens)]
    k, v, tables, table = make_cache(ctx, kv_heads, head_dim, page, dtype, device, gen)
    heads = group * kv_heads
    tokens = sum(q_lens)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(device)
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    scale = head_dim ** -0.5
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    tiles = as_int(extend_tiles(q_lens, extend_blocks(head_dim, dtype)[0], prefixes)) if use_tiles else None
    out = torch.full((tokens, heads * head_dim), float("nan"), dtype=dtype, device=device)
    extend_attention(q, k, v, table, as_int(starts), as_int(q_lens), as_int(prefixes), page, scale,
                     tiles=tiles, out=out, sliding_window=window,
                     max_query_len=None if use_tiles else max(q_lens))
    ref = reference(q, k, v, tables, page, list(zip(starts, q_lens, prefixes)), window, scale)
    return rel_error(out, ref, torch.arange(tokens, device=device))


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# batch, longest context, GQA group, KV heads, head dim, page, dtype, window, splits
DECODE_CASES = [
    (1, 1, 1, 2, 64, 16, BF16, None, "auto"),
    (7, 300, 2, 2, 128, 1, BF16, None, "auto"),
    (64, 4096, 4, 8, 128, 16, BF16, None, "auto"),
    (64, 2048, 8, 1, 128, 64, BF16, None, "auto"),
    (33, 1000, 1, 4, 64, 64, FP32, None, "auto"),
    (16, 4096, 4, 2, 128, 16, FP32, None, 7),
    (5, 3000, 2, 2, 80, 16, BF16, None, "auto"),
    (9, 2000, 8, 1, 96, 1, FP16, None, "auto"),
    (12, 1500, 4, 2, 128, 16, BF16, 256, "auto"),
    (3, 700, 2, 2, 64, 64, FP32, 100, 4),
    (4, 500, 2, 2, 256, 16, BF16, None, 3),
    (2, 4096, 1, 32, 128, 16, BF16, None, "auto"),
    (8, 4096, 4, 2, 64, 16, BF16, None, 1),
    (6, 40, 2, 2, 64, 16, FP32, None, 16),
    (24, 129, 8, 2, 80, 1, FP32, 17, 2),
    (40, 1024, 2, 4, 128, 64, FP16, None, "auto"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "b{}_ctx{}_g{}_kv{}_d{}_p{}_{}_w{}_s{}".format(
    *c[:6], str(c[6]).removeprefix("torch."), *c[7:]))
def test_decode_matches_float64_reference(case):
    for seed in (0, 1):
        err = run_decode_case(*case, seed=seed)
        record("decode", case[6], err)
        assert err < TOLERANCE[case[6]], f"relative error {err:.2e}"


def extend_shapes(kind: str, rng: random.Random, batch: int, longest: int) -> tuple[list[int], list[int]]:
    """(query lens, prefix lens) of a batch: prefill, chunked (prefix > 0) or mixed with decodes."""
    if kind == "prefill":
        q_lens = [rng.randint(1, longest) for _ in range(batch)]
        q_lens[0] = longest
        return q_lens, [0] * batch
    if kind == "chunked":
        q_lens = [rng.randint(2, longest) for _ in range(batch)]
        return q_lens, [rng.randint(1, 2 * longest) for _ in range(batch)]
    q_lens = [1 if i % 2 else rng.randint(2, longest) for i in range(batch)]
    return q_lens, [rng.randint(0, 2 * longest) for _ in range(batch)]


# kind, batch, longest query, GQA group, KV heads, head dim, page, dtype, window
EXTEND_CASES = [
    ("prefill", 4, 300, 2, 2, 128, 16, BF16, None),
    ("prefill", 1, 1, 1, 2, 64, 16, FP32, None),
    ("prefill", 3, 200, 4, 2, 64, 1, FP32, None),
    ("chunked", 3, 512, 4, 2, 128, 16, BF16, None),
    ("chunked", 5, 100, 8, 1, 128, 64, FP32, None),
    ("mixed", 16, 200, 2, 2, 64, 16, BF16, None),
    ("mixed", 12, 150, 1, 4, 80, 16, FP32, None),
    ("mixed", 8, 100, 4, 2, 96, 64, FP16, None),
    ("prefill", 2, 700, 2, 2, 128, 16, BF16, 128),
    ("chunked", 4, 300, 2, 2, 64, 1, FP32, 50),
    ("mixed", 6, 120, 8, 1, 80, 64, BF16, 33),
    ("chunked", 2, 200, 2, 2, 256, 16, BF16, None),
    ("chunked", 1, 2048, 4, 2, 128, 16, BF16, None),
    ("prefill", 4, 90, 2, 2, 16, 16, FP32, None),
]


@pytest.mark.parametrize("case", EXTEND_CASES, ids=lambda c: "{}_b{}_q{}_g{}_kv{}_d{}_p{}_{}_w{}".format(
    *c[:7], str(c[7]).removeprefix("torch."), c[8]))
def test_extend_matches_float64_reference(case):
    kind, batch, longest, group, kv_heads, head_dim, page, dtype, window = case
    for seed in (0, 1):
        q_lens, prefixes = extend_shapes(kind, random.Random(seed), batch, longest)
        if kind == "chunked" and longest == 2048:
            q_lens, prefixes = [2048], [2048]  # context 4096
        err = run_extend_case(q_lens, prefixes, group, kv_heads, head_dim, page, dtype, window, seed=seed,
                              use_tiles=seed == 0)
        record("extend", dtype, err)
        assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("window", [None, 24])
def test_backend_matches_torch_backend(dtype, window):
    """TritonAttentionBackend and the CPU reference backend agree on a mixed step (via metadata)."""
    from baton.services.engine.attention.base import AttentionMetadata, SequenceSlice
    from baton.services.engine.attention.torch_cpu import TorchAttentionBackend
    from baton.services.engine.attention.triton_backend import TritonAttentionBackend
    from baton.services.engine.kv.kv_cache import KVCache, KVLayout

    page, kv_heads, heads, head_dim = 4, 2, 8, 64
    layout = KVLayout(1, 64, page, kv_heads, head_dim, dtype)
    gen = torch.Generator().manual_seed(3)
    q_lens, prefixes = [1, 37, 1, 5, 1], [9, 0, 30, 17, 0]
    order = torch.randperm(layout.num_blocks, generator=gen).tolist()
    seqs, tables, slot_mapping, used = [], [], [], 0
    for i, (n, p) in enumerate(zip(q_lens, prefixes)):
        blocks = order[used:used + math.ceil((n + p) / page)]
        used += len(blocks)
        context = (torch.tensor(blocks)[:, None] * page + torch.arange(page)).reshape(-1)[:n + p]
        seqs.append(SequenceSlice(sum(q_lens[:i]), n, p, context))
        tables.append(blocks)
        slot_mapping.append(context[p:])
    tokens = sum(q_lens)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    prefix_k = torch.randn(layout.num_blocks * page, kv_heads, head_dim, generator=gen).to(dtype)
    prefix_v = torch.randn(layout.num_blocks * page, kv_heads, head_dim, generator=gen).to(dtype)
    outs = []
    for cls, device in ((TorchAttentionBackend, "cpu"), (TritonAttentionBackend, DEVICE)):
        cache = KVCache(layout, torch.device(device))
        cache.keys[0].copy_(prefix_k)
        cache.values[0].copy_(prefix_v)
        backend = cls(cache, heads, head_dim)
        meta = AttentionMetadata(seqs=[SequenceSlice(s.query_start, s.query_len, s.prefix_len,
                                                     s.context_slots.to(device)) for s in seqs],
                                 slot_mapping=torch.cat(slot_mapping).to(device), sliding_window=window,
                                 block_tables=tables if cls is TritonAttentionBackend else None, page_size=page)
        backend.prepare(meta)
        outs.append(backend.forward(0, q.to(device), k.to(device), v.to(device), meta).double().cpu())
    err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    record("backend", dtype, err)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


def test_zzz_report_max_errors():
    """Prints the largest relative errors seen (run last in this module)."""
    for key, err in sorted(MAX_ERRORS.items()):
        print(f"max relative error {key}: {err:.2e}")

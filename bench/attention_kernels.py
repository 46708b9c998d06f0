"""Paged-attention kernel timings on CUDA: the Triton decode / extend kernels against torch.

    python -m baton.bench.attention_kernels [--quick]

References, measured in the same run on the same GPU:
- torch-paged: what the engine's torch backend does (gather K/V from the paged cache by
  slot + SDPA with a length mask, GQA through enable_gqa);
- sdpa-dense: SDPA on K/V already contiguous per sequence, no paging, no mask (a lower
  bound for what a library kernel does with no indirection; it does not read the cache).
Times are medians of `triton.testing.do_bench` (CUDA events); GB/s counts the K/V bytes
each sequence's context must read once.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def paged_setup(batch: int, ctx: int, heads: int, kv_heads: int, dim: int, page: int, dtype: torch.dtype):
    blocks_per_seq = (ctx + page - 1) // page
    total = batch * blocks_per_seq
    order = torch.randperm(total, device="cuda").to(torch.int32)
    table = order.view(batch, blocks_per_seq)
    k = torch.randn(total * page, kv_heads, dim, device="cuda", dtype=dtype)
    v = torch.randn(total * page, kv_heads, dim, device="cuda", dtype=dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k, v, table, lens


def bench_decode(batch: int, ctx: int, heads: int, kv_heads: int, dim: int, page: int, dtype: torch.dtype):
    from triton.testing import do_bench

    from baton.services.engine.attention.triton_kernels import decode_attention, num_decode_splits
    k, v, table, lens = paged_setup(batch, ctx, heads, kv_heads, dim, page, dtype)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=dtype)
    scale = dim ** -0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = num_decode_splits(batch, kv_heads, ctx, sms)
    out = torch.empty(batch, heads * dim, device="cuda", dtype=dtype)
    rows = torch.arange(batch, dtype=torch.int32, device="cuda")
    ws = (torch.empty(batch, heads, splits, dim, device="cuda", dtype=torch.float32),
          torch.empty(batch, heads, splits, device="cuda", dtype=torch.float32))

    def triton_auto():
        decode_attention(q, k, v, table, lens, page, scale, q_rows=rows, out=out, num_splits=splits, workspace=ws)

    def triton_one():
        decode_attention(q, k, v, table, lens, page, scale, q_rows=rows, out=out, num_splits=1)

    pos = torch.arange(ctx, device="cuda")
    slots = (table.long()[:, pos // page] * page + pos % page).reshape(-1)
    mask = (pos[None, :] < lens[:, None])[:, None, None, :]
    qd = q[:, :, None, :]

    def torch_paged():
        kk = k.index_select(0, slots).view(batch, ctx, kv_heads, dim).transpose(1, 2)
        vv = v.index_select(0, slots).view(batch, ctx, kv_heads, dim).transpose(1, 2)
        return F.scaled_dot_product_attention(qd, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)

    kd = k.index_select(0, slots).view(batch, ctx, kv_heads, dim).transpose(1, 2).contiguous()
    vd = v.index_select(0, slots).view(batch, ctx, kv_heads, dim).transpose(1, 2).contiguous()

    def sdpa_dense():
        return F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True)

    # correctness against the dense reference before timing
    triton_auto()
    ref = sdpa_dense().reshape(batch, -1).float()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    bytes_moved = 2 * batch * ctx * kv_heads * dim * k.element_size()
    rows_out = []
    for name, fn in (("triton", triton_auto), ("triton-1split", triton_one), ("torch-paged", torch_paged),
                     ("sdpa-dense", sdpa_dense)):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows_out.append((name, ms, bytes_moved / ms / 1e6))
    return splits, err, rows_out


def bench_extend(q_len: int, prefix: int, heads: int, kv_heads: int, dim: int, page: int, dtype: torch.dtype,
                 configs: list | None = None):
    from triton.testing import do_bench

    from baton.services.engine.attention.triton_kernels import extend_attention, extend_config, extend_tiles
    ctx = prefix + q_len
    k, v, table, _ = paged_setup(1, ctx, heads, kv_heads, dim, page, dtype)
    q = torch.randn(q_len, heads, dim, device="cuda", dtype=dtype)
    scale = dim ** -0.5
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device="cuda")  # noqa: E731
    out = torch.empty(q_len, heads * dim, device="cuda", dtype=dtype)

    def make(config):
        tiles = i32(extend_tiles([q_len], config[0], [prefix]))

        def run():
            extend_attention(q, k, v, table, i32([0]), i32([q_len]), i32([prefix]), page, scale, tiles=tiles,
                             out=out, config=config)
        return run
    triton_extend = make(extend_config(dim, dtype))

    pos = torch.arange(ctx, device="cuda")
    slots = table.long()[0, pos // page] * page + pos % page
    kd = k[slots].transpose(0, 1)[None].contiguous()
    vd = v[slots].transpose(0, 1)[None].contiguous()
    qd = q.transpose(0, 1)[None]
    mask = pos[None, :] <= (prefix + torch.arange(q_len, device="cuda"))[:, None]

    def sdpa_dense():
        if prefix == 0:
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)

    triton_extend()
    ref = sdpa_dense()[0].transpose(0, 1).reshape(q_len, -1).float()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    flops = 4 * heads * dim * (q_len * prefix + q_len * (q_len + 1) / 2)
    rows_out = []
    for name, fn in (("triton-extend", triton_extend), ("sdpa-dense", sdpa_dense)):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows_out.append((name, ms, flops / ms / 1e9))
    for config in configs or []:
        try:
            fn = make(config)
            fn()
            bad = ((out.float() - ref).norm() / ref.norm()).item() > 1e-2
            ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this config
            print(f"  config {config}: {type(exc).__name__}")
            continue
        rows_out.append((f"{'BAD ' if bad else ''}{'/'.join(map(str, config))}", ms, flops / ms / 1e9))
    return err, rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the headline decode shape")
    parser.add_argument("--skip-decode", action="store_true", help="only the extend timings")
    parser.add_argument("--sweep-extend", action="store_true",
                        help="also time extend BLOCK_M/BLOCK_N/warps/stages variants")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    decode_shapes = [(64, 2048, 32, 8, 128, 16)]
    if not args.quick:
        decode_shapes += [(1, 8192, 32, 8, 128, 16), (8, 4096, 32, 8, 128, 16), (256, 512, 32, 8, 128, 16),
                          (64, 2048, 32, 8, 128, 1), (32, 1024, 32, 32, 128, 16), (64, 2048, 9, 3, 64, 16)]
    if args.skip_decode:
        decode_shapes = []
    print("\ndecode, bf16 (GB/s = K+V bytes of the contexts / time)")
    print(f"{'batch':>5} {'ctx':>5} {'Hq/Hkv/D':>10} {'page':>4} {'splits':>6} {'rel.err':>8} | "
          f"{'impl':<14} {'ms':>8} {'GB/s':>7} {'x torch-paged':>13}")
    for batch, ctx, heads, kv_heads, dim, page in decode_shapes:
        splits, err, rows = bench_decode(batch, ctx, heads, kv_heads, dim, page, torch.bfloat16)
        base = dict((name, ms) for name, ms, _ in rows)["torch-paged"]
        for name, ms, gbs in rows:
            print(f"{batch:>5} {ctx:>5} {f'{heads}/{kv_heads}/{dim}':>10} {page:>4} {splits:>6} {err:>8.1e} | "
                  f"{name:<14} {ms:>8.3f} {gbs:>7.0f} {base / ms:>12.2f}x")
    if not args.quick:
        print("\nextend (prefill / chunked prefill), bf16, 32/8/128, page 16 (TFLOP/s of the causal attention)")
        print(f"{'q_len':>5} {'prefix':>6} {'rel.err':>8} | {'impl':<14} {'ms':>8} {'TFLOP/s':>8}")
        configs = None
        if args.sweep_extend:
            configs = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
        for q_len, prefix in ((4096, 0), (2048, 2048), (512, 3584)):
            err, rows = bench_extend(q_len, prefix, 32, 8, 128, 16, torch.bfloat16, configs)
            for name, ms, tflops in rows:
                print(f"{q_len:>5} {prefix:>6} {err:>8.1e} | {name:<14} {ms:>8.3f} {tflops:>8.1f}")


if __name__ == "__main__":
    main()

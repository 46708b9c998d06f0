"""Small-batch GEMV in Triton: y = prologue(x) @ W^T for a few rows of x (batch-1 decode).

At one token a step every linear layer is a pure weight stream: the GPU's time is
the bytes of W over the memory bandwidth, plus the launch and ramp of each kernel. This
kernel streams W [N, K] (row-major, as nn.Linear stores it) in [BLOCK_N, BLOCK_K] tiles,
multiplies each by the matching slice of every row of x and accumulates in float32, so W
is read exactly once whatever the number of rows. It can also compute its input on the fly,
which removes a separate elementwise launch per layer:

- `PRO_NONE`: x as given;
- `PRO_SILU_MUL`: x is the fused gate/up output [M, 2K]; the kernel uses silu(gate) * up
  (the MLP's down projection), rounded as `triton_ops.silu_and_mul` rounds.

In a CUDA graph on an H100 the Llama-3.1-8B projections stream at 2.4-3.1 TB/s this way
against cuBLAS's 2.1-2.9 (bench/RESULTS.md): 32 layers' projections take 97% of the
copy-bandwidth limit instead of 89%. From two rows on cuBLAS wins, so the engine uses the
kernel for one-token steps only (`AUTO_GEMV_ROWS`).

Results equal torch's up to float32 summation order. Only half-precision weights take this
path (`use_gemv`); float32 keeps cuBLAS, so the float32 equality tests are untouched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PRO_NONE = 0
PRO_SILU_MUL = 1
MAX_GEMV_ROWS = 4
"""Most rows of x the kernel takes (each extra row reuses the same weight tile)."""
AUTO_GEMV_ROWS = 1
"""Most rows for which `use_gemv` picks the kernel over cuBLAS: measured on an H100 in a CUDA graph
(bench.decode_profile chain), 32 layers' projections take 4.79 ms against cuBLAS's 5.23 at one
row, but 5.41 against 5.24 at two rows and 6.95 against 5.24 at four."""


@triton.jit
def _gemv_kernel(X, W, B, Y, N, stride_xm, stride_wn, stride_ym,
                 K: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRO: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = rows < N
    w_base = W + rows[:, None].to(tl.int64) * stride_wn
    x_base = X + offs_m[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            k_mask = offs_k < BLOCK_K
        else:
            k_mask = kk < K
        if EVEN_N and EVEN_K:
            w = tl.load(w_base + kk[None, :])
        else:
            w = tl.load(w_base + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x_mask = m_mask[:, None] & k_mask[None, :]
        if PRO == 1:
            g = tl.load(x_base + kk[None, :], mask=x_mask, other=0.0)
            u = tl.load(x_base + K + kk[None, :], mask=x_mask, other=0.0)
            gf = g.to(tl.float32)
            act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
            x = (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        else:
            x = tl.load(x_base + kk[None, :], mask=x_mask, other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + rows[None, :], y.to(Y.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def gemv_config(rows: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for `rows` rows of x and a weight of [n, k].

    Tuned on an H100 with every Llama-3.1-8B projection in a CUDA graph (bench.decode_profile):
    1024-wide K tiles, 2 weight rows a program for the small projections (qkv, o: more
    programs in flight), 4 for the wide ones (gate/up, LM head), 8 for the long-K down
    projection. More rows of x shrink the tile so the float32 accumulator stays in registers."""
    block_m = triton.next_power_of_2(rows)
    block_n = 8 if k >= 8192 else 4 if n >= 16384 else 2
    block_k = min(1024, max(64, triton.next_power_of_2(k)), 8192 // (block_m * block_n))
    return block_n, block_k, 4, 1


def gemv(x: torch.Tensor, weight: torch.Tensor, prologue: int = PRO_NONE, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """prologue(x) [M, K] @ weight[N, K]^T (+ bias) -> [M, N] in x's dtype, for M <= MAX_GEMV_ROWS.

    With `PRO_SILU_MUL`, x is [M, 2K] and the kernel multiplies silu(x[:, :K]) * x[:, K:]."""
    rows = x.shape[0]
    n, k = weight.shape
    width = 2 * k if prologue == PRO_SILU_MUL else k
    assert x.dim() == 2 and x.shape[1] == width and x.stride(1) == 1 and weight.stride(1) == 1
    assert 1 <= rows <= MAX_GEMV_ROWS, "gemv takes 1 to MAX_GEMV_ROWS rows"
    if out is None:
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, num_stages = config or gemv_config(rows, n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, out, n, x.stride(0), weight.stride(0), out.stride(0),
        K=k, M=rows, BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k, PRO=prologue,
        HAS_BIAS=bias is not None, EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `gemv` should replace the GEMM: CUDA, half-precision weights, at most AUTO_GEMV_ROWS rows."""
    return (x.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and 1 <= x.shape[0] <= AUTO_GEMV_ROWS and weight.stride(1) == 1 and x.stride(1) == 1)


def wants_gemv(x: torch.Tensor, layer: torch.nn.Module) -> bool:
    """`use_gemv`, unless start-up tuning (`gemv_tuning`) found cuBLAS faster for this layer
    (its `gemv_config` is None; an untuned layer has none and uses the default config)."""
    return getattr(layer, "gemv_config", ()) is not None and use_gemv(x, layer.weight)


def layer_config(layer: torch.nn.Module) -> tuple[int, int, int, int] | None:
    """The tuned Triton config of a layer, or None for `gemv_config`'s default."""
    return getattr(layer, "gemv_config", ()) or None


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """layer(x), through `gemv` when it pays (`wants_gemv`), else through cuBLAS."""
    if wants_gemv(x, layer):
        return gemv(x, layer.weight, bias=layer.bias, config=layer_config(layer))
    return layer(x)

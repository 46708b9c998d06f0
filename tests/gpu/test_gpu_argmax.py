"""The two-kernel Triton argmax equals torch's argmax: random rows, ties, -inf rows, NaN."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine.sampling.gpu_argmax import CHUNK, argmax_rows  # noqa: E402


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 151936), (64, 32000), (5, 100), (2, CHUNK),
                                        (2, CHUNK + 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_equals_torch(rows: int, vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=gen).to(dtype).cuda()
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_ties_nan_and_all_masked_rows() -> None:
    x = torch.randn(4, 20000, device="cuda")
    x[0, [17, 9000, 19999]] = 50.0           # a tie across chunks: the first index wins
    x[1, :] = float("-inf")                  # everything masked: index 0, as torch
    x[2, 12345] = float("nan")               # NaN is the largest, as torch
    x[3, 4095:4097] = 60.0                   # a tie across a chunk edge
    got = argmax_rows(x)
    assert got.tolist() == [17, 0, 12345, 4095]
    assert torch.equal(got, x.argmax(dim=-1))


def test_strided_rows_and_cpu_fallback() -> None:
    x = torch.randn(6, 9000, device="cuda")[::2]
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    y = torch.randn(2, 50)
    assert torch.equal(argmax_rows(y), y.argmax(dim=-1))

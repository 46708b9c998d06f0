"""Host lists reach the GPU through fresh pinned buffers: the values arrive intact even when
many copies are queued back to back behind GPU work (the caching host allocator must not
hand a buffer out again before its copy has run)."""
from __future__ import annotations

import torch

from baton.services.engine.host_copy import to_device_async


def test_queued_copies_keep_their_values() -> None:
    device = torch.device("cuda", 0)
    a = torch.randn(2048, 2048, device=device)
    busy = a @ a  # keep the stream busy while the copies queue up behind it
    outs = [to_device_async(torch.arange(i, i + 64, dtype=torch.long), device) for i in range(200)]
    torch.cuda.synchronize()
    assert busy.isfinite().all()
    for i, out in enumerate(outs):
        assert out.device == device and torch.equal(out.cpu(), torch.arange(i, i + 64))

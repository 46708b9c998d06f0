"""`to_device_async` off the GPU is a plain copy to the target device."""
from __future__ import annotations

import torch

from baton.services.engine.host_copy import to_device_async


def test_cpu_target_keeps_values_and_dtype() -> None:
    host = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32)
    out = to_device_async(host, torch.device("cpu"))
    assert out.dtype == torch.int32 and torch.equal(out, host)

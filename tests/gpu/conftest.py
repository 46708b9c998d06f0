"""GPU tests: every test under tests/gpu needs CUDA (and Triton) and is skipped without them.

Nothing here imports xgrammar, pyzmq or nixl: the GPU image lacks them.
"""
from __future__ import annotations

import pytest
import torch


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs Triton"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    here = str(config.rootpath / "tests" / "gpu")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))

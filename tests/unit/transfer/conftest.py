"""Fixtures for the transfer-engine tests: engines over small random memories, closed at teardown.

NIXL/UCX must stay on loopback here (and in spawned children, which inherit os.environ),
so the environment is set before anything imports nixl.
"""
from __future__ import annotations

import os

os.environ.setdefault("UCX_NET_DEVICES", "lo")

import pytest  # noqa: E402

from baton.services.transfer import RegionLayout, TransferEngine, create_transfer_engine  # noqa: E402
from tests.unit.transfer.helpers import filled_memory, small_layout  # noqa: E402


@pytest.fixture
def make_engine():
    """make_engine(backend, worker_id, layout=None, seed=0, **options) -> engine over a seeded
    memory of one region (`layout`, default `small_layout()`); closed at teardown."""
    engines: list[TransferEngine] = []

    def make(backend: str, worker_id: str, layout: RegionLayout | None = None, seed: int = 0, **options):
        engine = create_transfer_engine(backend, worker_id, filled_memory(layout or small_layout(), seed=seed),
                                        **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()

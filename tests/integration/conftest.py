"""Fixtures for engine integration tests: tiny model folders and engines checked for leaks."""
from __future__ import annotations

from pathlib import Path

import pytest

from baton.services.engine import LLM
from tests.helpers.tiny_models import load_hf, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(name) -> folder of that tiny random-weight model (built once)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_tiny_model(name, tmp_path_factory.mktemp(name))
        return built[name]
    return get


@pytest.fixture(scope="session")
def hf_model():
    """Factory: hf_model(folder) -> the transformers reference model (loaded once)."""
    loaded = {}

    def get(folder: Path):
        if folder not in loaded:
            loaded[folder] = load_hf(folder)
        return loaded[folder]
    return get


@pytest.fixture
def make_llm():
    """Factory for LLMs; after the test every engine must be idle with its pool whole again."""
    made: list[LLM] = []

    def make(model: Path | str, **options) -> LLM:
        options.setdefault("num_threads", 2)
        llm = LLM(model=str(model), **options)
        made.append(llm)
        return llm
    yield make
    for llm in made:
        llm.engine.check_idle_integrity()
        llm.engine.reset_prefix_cache()
        assert llm.engine.pool.num_free == llm.engine.pool.num_blocks

"""Baton: a disaggregated encode / prefill / decode LLM serving cluster.

This package is the one import namespace of the project. Installed, the repository's fixed
folders live inside it (`pyproject.toml` maps them with `package-dir`): `baton.services`,
`baton.router`, `baton.protos`, `baton.deploy`, `baton.bench`. Run from a source checkout
without an install (a GPU machine that received a copy of the tree, say), the checkout's
root is added to this package's search path, so the same names resolve to the same folders.

The facade names are what vLLM and SGLang users expect, loaded on first use so that
`import baton.router` never pulls in the engine (or torch):

    from baton import LLM, SamplingParams

and the frontend language (`baton.lang`, without torch): `@baton.function`, `baton.gen`,
`baton.select`, `baton.user`, `baton.RuntimeEndpoint`, `baton.set_default_backend`, ...
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "services" / "engine").is_dir():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (a package's own __path__)

_LANG = ("function", "gen", "select", "system", "user", "assistant", "image", "RuntimeEndpoint",
         "set_default_backend", "get_default_backend", "reset_default_backend", "ProgramState", "ProgramError",
         "BackendError")
"""The frontend language's names (`baton.lang`, docs/lang.md): `@baton.function`, `baton.gen`, ..."""

_FACADE = {
    "LLM": ("baton.services.engine", "LLM"),
    "SamplingParams": ("baton.services.engine", "SamplingParams"),
    **{name: ("baton.lang", name) for name in _LANG},
}
"""Facade name -> (module, attribute), imported lazily by `__getattr__`."""

__all__ = sorted(_FACADE)

if TYPE_CHECKING:
    from baton.lang import (BackendError, ProgramError, ProgramState, RuntimeEndpoint, assistant, function, gen,
                            get_default_backend, image, reset_default_backend, select, set_default_backend, system,
                            user)
    from baton.services.engine import LLM
    from baton.services.engine import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _FACADE:
        raise AttributeError(f"module 'baton' has no attribute {name!r}")
    import importlib
    module, attr = _FACADE[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value

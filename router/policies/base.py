"""The policy plugin interface and its registry.

A policy picks one worker of a role for one request. The router owns the worker list and
calls, for every request and role:

1. ``select(workers, prompt_token_ids)``: ``workers`` is already filtered to the healthy,
   non-excluded workers of that role (a retry excludes the ones that failed) and is never
   empty when the router calls; a policy raises ``ValueError`` on an empty list anyway.
   ``select`` must not mutate the views.
2. ``on_dispatch(worker, prompt_token_ids)`` after the request was actually sent there
   (a policy that learns from its choices, such as cache_aware, learns here, not in
   ``select``: a selected worker may never receive the request).
3. ``on_worker_removed(address)`` when a worker leaves the registry, so per-worker state
   is dropped and memory stays bounded.

Invariants: ``select`` returns one of the given views; the same inputs and the same
history give the same answer (policies with randomness take a seed). Policies are not
thread-safe: the router calls them from its one event loop.

Registry: ``@register_policy`` puts a class in ``POLICIES`` under its ``name``;
``make_policy(name, **params)`` builds one, with a ``ValueError`` naming the known
policies or the accepted parameters when either is wrong. Importing ``router.policies``
imports every built-in policy, so the registry is complete whatever module is imported.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Sequence, TypeVar

from baton.router.types import WorkerView

POLICIES: dict[str, type["Policy"]] = {}
"""Policy name -> class, filled by ``@register_policy``."""

_P = TypeVar("_P", bound=type["Policy"])


class Policy(ABC):
    """Chooses a worker for a request (see the module docstring for the call protocol)."""

    name: str = ""

    @abstractmethod
    def select(self, workers: list[WorkerView], prompt_token_ids: Sequence[int]) -> WorkerView:
        """One of ``workers`` for this prompt; ``ValueError`` when ``workers`` is empty."""

    def on_dispatch(self, worker: WorkerView, prompt_token_ids: Sequence[int]) -> None:
        """The router sent this prompt to ``worker``. Default: nothing to learn."""

    def on_worker_removed(self, address: str) -> None:
        """``address`` left the registry; drop any state kept for it. Default: none kept."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def require_workers(workers: Sequence[WorkerView]) -> None:
    """The shared guard every ``select`` starts with."""
    if not workers:
        raise ValueError("no workers to select from")


def least_loaded(workers: Sequence[WorkerView]) -> WorkerView:
    """The worker with the lowest ``load``, ties broken by the smaller address."""
    require_workers(workers)
    return min(workers, key=lambda w: (w.load, w.address))


def register_policy(cls: _P) -> _P:
    """Class decorator: add ``cls`` to ``POLICIES`` under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise TypeError(f"policy name {cls.name!r} is already taken by {POLICIES[cls.name].__name__}")
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **params: object) -> Policy:
    """Build the policy registered as ``name`` with keyword ``params``.

    Raises ``ValueError`` for an unknown name (listing the known ones), an unknown
    parameter (listing the accepted ones) or a value the policy rejects."""
    cls = POLICIES.get(name)
    if cls is None:
        known = ", ".join(sorted(POLICIES)) or "(none registered)"
        raise ValueError(f"unknown routing policy {name!r}; known policies: {known}")
    accepted = [p.name for p in inspect.signature(cls).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"policy {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted) or '(none)'}")
    return cls(**params)

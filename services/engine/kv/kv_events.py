"""The prefix cache's event sink: how a radix cache tells the world which pages it holds.

The engine knows no wire format. A `RadixCache` whose `events` attribute holds a sink calls
it on every change to the set of cached pages; the worker shell's publisher
(services/worker/kv_events.py) turns the calls into chain-hashed `baton.v1.KVEvent`s for
the router's precise cache-aware routing. Calls come from the engine's own thread.

Both calls name pages by token ids: `prefix` is the whole token path before the first page
concerned (whole pages), `tokens` the pages themselves (whole pages). A node split changes
no page, so it sends nothing.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class KVEventSink(Protocol):
    """Receives a prefix cache's changes (from the engine thread)."""

    def stored(self, prefix: Sequence[int], tokens: Sequence[int]) -> None:
        """The pages of `tokens`, following `prefix`, are now cached."""

    def removed(self, prefix: Sequence[int], tokens: Sequence[int]) -> None:
        """The pages of `tokens`, following `prefix`, were evicted."""

    def cleared(self) -> None:
        """Nothing is cached any more."""

"""Deterministic token ids for simulated workers: a stand-in for a greedy model.

The next token is a function of the whole context before it (a rolling hash over every
token id so far, seeded), like greedy decoding with a fixed model. So a stream is checkable
for loss and duplication, and a stream migrated to another worker (prompt + tokens already
sent, as the router re-submits it) continues with exactly the tokens the first worker would
have produced. `expected_tokens` computes a whole stream offline for tests.
"""
from __future__ import annotations

from typing import Iterable, Sequence

_MASK = (1 << 64) - 1
_MULT = 0x100000001B3


class TokenStream:
    """The rolling state of one context; `next()` appends and returns the next token id."""

    __slots__ = ("state", "vocab")

    def __init__(self, context: Iterable[int], vocab: int, seed: int = 0) -> None:
        self.vocab = vocab
        self.state = (0xCBF29CE484222325 ^ seed) & _MASK
        for token in context:
            self._mix(token)

    def _mix(self, token: int) -> None:
        self.state = ((self.state ^ (token + 1)) * _MULT) & _MASK

    def peek(self) -> int:
        """The next token id, without consuming it."""
        x = self.state
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & _MASK
        x ^= x >> 29
        return x % self.vocab

    def next(self) -> int:
        """The next token id; it joins the context."""
        token = self.peek()
        self._mix(token)
        return token


def expected_tokens(prompt: Sequence[int], count: int, vocab: int = 32000, seed: int = 0) -> list[int]:
    """The `count` tokens a simulated worker streams for `prompt`."""
    stream = TokenStream(prompt, vocab, seed)
    return [stream.next() for _ in range(count)]

"""Stop strings over streamed text for one completion: `StopStringChecker`.

Owns finding a stop string in text that arrives in deltas (a stop string may span several),
cutting the output exactly before it (or right after it with include_stop_str_in_output),
and holding back a tail that could still become a stop string, so streamed text never shows
part of one. The held tail is released by the next delta that rules it out, or by `flush()`
when generation ends for another reason (EOS, max_tokens, ...).

Which stop wins when several match: the one that completes first in the text (the smallest
end position), and among those ending at the same place, the longest (earliest start). This
is what a character-by-character stream would see, so the result does not depend on how the
text was split into deltas; in the common case it is also the one that starts first.
"""
from __future__ import annotations

from typing import Optional, Sequence


class StopStringChecker:
    """Feed text deltas; get back what is safe to emit and whether a stop string was hit."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._include = include_stop_str_in_output
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self._stopped = False
        self._matched: Optional[str] = None

    @property
    def stopped(self) -> bool:
        """True once a stop string has been found; later deltas are ignored."""
        return self._stopped

    @property
    def matched_stop(self) -> Optional[str]:
        """The stop string that ended the text (OpenAI's stop_reason), or None."""
        return self._matched

    @property
    def pending(self) -> str:
        """Text held back because it could be the start of a stop string."""
        return self._pending

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a delta; returns (text safe to emit now, stopped)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._pending + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._stopped = True
            self._matched = stop
            self._pending = ""
            return text[: start + len(stop) if self._include else start], True
        held = self._partial_tail_length(text)
        self._pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held], False

    def flush(self) -> str:
        """Generation ended for another reason: release the held-back tail."""
        tail, self._pending = self._pending, ""
        return tail

    def _first_match(self, text: str) -> Optional[tuple[int, str]]:
        """(start, stop string) of the stop that ends first in `text`, longest on a tie."""
        best: Optional[tuple[int, int, str]] = None  # (end, -length, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), -len(stop), stop)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        end, _, stop = best
        return end - len(stop), stop

    def _partial_tail_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[len(text) - length :]
            if any(stop.startswith(tail) for stop in self._stops if len(stop) > length):
                return length
        return 0

"""What a program needs of a serving backend, and the default backend.

`Backend` is four calls: `generate` (text after a prompt, optionally constrained by a regex
or a JSON schema), `select` (the most likely of a few continuations, scored on the server),
`cache_prefix` (compute a prompt once so that forks reuse it) and `render` (a chat as the
model's template writes it). A prompt is plain text or chat messages (`Prompt`); messages are
always rendered by the server, with the model's own chat template.
`RuntimeEndpoint` (runtime_endpoint.py) is the backend over a Baton gateway.

The default backend is SGLang's API (`set_default_backend`): a module-level holder, used by
`Program.run` / `run_batch` when no `backend=` is given. `reset_default_backend()` empties it
(tests do); `get_default_backend()` raises a clear error while it is empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence


@dataclass(frozen=True)
class Prompt:
    """What comes before a call: plain `text`, or chat `messages`."""

    text: Optional[str] = None
    messages: Optional[tuple[dict[str, Any], ...]] = None
    open_reply: bool = False
    """The last message is the assistant's, still being written: calls continue it. Otherwise a
    `generate` / `select` starts the assistant's reply after the messages."""

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a prompt is either text or messages")
        if self.open_reply and (not self.messages or self.messages[-1].get("role") != "assistant"):
            raise ValueError("open_reply needs the last message to be the assistant's")

    @property
    def is_empty(self) -> bool:
        return not self.text if self.text is not None else not self.messages


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings of one call (the program defaults filled in)."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None


@dataclass(frozen=True)
class GenerateCall:
    prompt: Prompt
    sampling: Sampling
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    """A JSON schema as JSON text."""


@dataclass
class Completion:
    """What `generate` returns."""

    text: str
    finish_reason: Optional[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the server took from its prefix cache."""

    @property
    def meta(self) -> dict[str, Any]:
        return {"finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens}


@dataclass
class Selection:
    """What `select` returns: the chosen index and every choice's length-normalised score."""

    index: int
    choices: Sequence[str]
    scores: list[float]
    """Mean log-probability of each choice's tokens after the shared prefix."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    details: list[dict[str, Any]] = field(default_factory=list)
    """Per choice: tokens, their logprobs, cached prompt tokens (as the server sent them)."""

    @property
    def text(self) -> str:
        return self.choices[self.index]

    @property
    def meta(self) -> dict[str, Any]:
        return {"scores": self.scores, "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "choices": self.details}


class Backend(Protocol):
    """A serving backend for programs."""

    def generate(self, call: GenerateCall) -> Completion:
        """Text after the prompt."""

    def select(self, prompt: Prompt, choices: Sequence[str]) -> Selection:
        """The most likely continuation among `choices`."""

    def cache_prefix(self, prompt: Prompt) -> None:
        """Compute the prompt so that later calls sharing it reuse the server's prefix cache."""

    def render(self, prompt: Prompt) -> str:
        """The prompt's text as the model sees it (chat messages through its template)."""


_default_backend: Optional[Backend] = None
"""The holder `set_default_backend` fills (SGLang's API); see the module doc."""


def set_default_backend(backend: Backend) -> None:
    """Use `backend` for programs run without `backend=`."""
    global _default_backend
    for method in ("generate", "select", "cache_prefix", "render"):
        if not callable(getattr(backend, method, None)):
            raise TypeError(f"{type(backend).__name__} is not a backend: it has no {method}()")
    _default_backend = backend


def reset_default_backend() -> None:
    """Forget the default backend."""
    global _default_backend
    _default_backend = None


def get_default_backend() -> Backend:
    """The default backend; a clear error when none was set."""
    if _default_backend is None:
        raise RuntimeError("no backend: pass backend= to run() / run_batch(), or call "
                           "baton.set_default_backend(baton.RuntimeEndpoint(URL)) first")
    return _default_backend

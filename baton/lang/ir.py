"""The expressions a program appends to its state: text, `gen`, `select`, roles and images.

Constructors (`gen`, `select`, `system`, `user`, `assistant`, `image`) validate their
arguments at once, so a bad call fails where it is written (`ValueError` / `TypeError`
naming the argument), never later on the server. Expressions concatenate with `+` (with
each other and with strings): `"The answer is " + gen("answer")` is one `ExprList`.
Nothing here talks to a backend: `interpreter.py` runs expressions against a state.
"""
from __future__ import annotations

import base64
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

ROLES = ("system", "user", "assistant")


class Expr:
    """Something a program appends to its state (`s += expr`)."""

    def __add__(self, other: Union["Expr", str]) -> "ExprList":
        return ExprList([self, as_expr(other)])

    def __radd__(self, other: Union["Expr", str]) -> "ExprList":
        return ExprList([as_expr(other), self])

    def describe(self) -> str:
        """How error messages name this step."""
        return type(self).__name__.lower()


def as_expr(value: Union[Expr, str]) -> Expr:
    """A string as `Text`; an expression as itself; anything else is a TypeError."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"a program appends text or baton expressions (gen, select, roles, image), "
                    f"not {type(value).__name__}")


@dataclass(frozen=True)
class Text(Expr):
    value: str

    def describe(self) -> str:
        short = self.value if len(self.value) <= 24 else self.value[:21] + "..."
        return f"text {short!r}"


@dataclass(frozen=True)
class ExprList(Expr):
    items: list[Expr]

    def __post_init__(self) -> None:
        flat: list[Expr] = []
        for item in self.items:
            flat.extend(item.items if isinstance(item, ExprList) else [item])
        object.__setattr__(self, "items", flat)

    def describe(self) -> str:
        return " + ".join(item.describe() for item in self.items)


@dataclass(frozen=True)
class SamplingArgs:
    """Sampling fields of one `gen`; None means the program's default (`run(...)` arguments)."""

    max_tokens: Optional[int] = None
    stop: Optional[tuple[str, ...]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens must be a positive int"),
            (self.temperature is None or self.temperature >= 0, "temperature must be non-negative"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k is None or self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (off) or positive"),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.stop is None or all(isinstance(s, str) and s for s in self.stop),
             "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Gen(Expr):
    """Generate text at the end of the state (stored under `name` when given)."""

    name: Optional[str]
    sampling: SamplingArgs = field(default_factory=SamplingArgs)
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    """A JSON schema as JSON text."""

    def describe(self) -> str:
        return f"gen({self.name!r})" if self.name else "gen()"


@dataclass(frozen=True)
class Select(Expr):
    """Append the choice the model finds most likely (scored on the server)."""

    name: Optional[str]
    choices: tuple[str, ...]

    def describe(self) -> str:
        return f"select({self.name!r})" if self.name else "select()"


@dataclass(frozen=True)
class Role(Expr):
    """A whole message of one role; `content` None with `edge` set is a role block's begin or end."""

    role: str
    content: Optional[Expr] = None
    edge: Optional[str] = None
    """None: a whole message; "begin" / "end": one edge of a `with s.user():` block."""

    def describe(self) -> str:
        if self.edge is not None:
            return f"{self.role}() block {self.edge}"
        return f"{self.role}({self.content.describe() if self.content else ''})"


@dataclass(frozen=True)
class Image(Expr):
    """An image in the current user message (served by vision-language models only)."""

    data: bytes
    mime: str

    @property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"

    def describe(self) -> str:
        return f"image({len(self.data)} bytes)"


def _check_name(name: Optional[str]) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"a variable name must be a non-empty string, not {name!r}")


def gen(name: Optional[str] = None, max_tokens: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
        temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
        min_p: Optional[float] = None, frequency_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None, seed: Optional[int] = None, regex: Optional[str] = None,
        json_schema: Union[str, dict, None] = None, choices: Optional[Sequence[str]] = None) -> Expr:
    """Generate text (SGLang's `gen`); `regex` / `json_schema` constrain it token by token on the
    server; `choices` makes it a `select`."""
    _check_name(name)
    if choices is not None:
        return select(name, choices=choices)
    if regex is not None and json_schema is not None:
        raise ValueError("give at most one of regex and json_schema")
    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    elif json_schema is not None:
        try:
            json.loads(json_schema)
        except (TypeError, ValueError) as error:
            raise ValueError(f"json_schema must be a dict or JSON text: {error}") from None
    stops = (stop,) if isinstance(stop, str) else (tuple(stop) if stop is not None else None)
    sampling = SamplingArgs(max_tokens=max_tokens, stop=stops, temperature=temperature, top_p=top_p, top_k=top_k,
                            min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                            seed=seed)
    return Gen(name=name, sampling=sampling, regex=regex, json_schema=json_schema)


def select(name: Optional[str] = None, choices: Optional[Sequence[str]] = None, temperature: float = 0.0) -> Select:
    """Append the most likely of `choices` (SGLang's `select`; `temperature` is accepted for
    SGLang's signature: the scores are log-probabilities, nothing is sampled)."""
    _check_name(name)
    if isinstance(choices, str) or not choices:
        raise ValueError("select needs a non-empty list of choices")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError("every choice must be a non-empty string")
    if temperature < 0:
        raise ValueError("temperature must be non-negative")
    return Select(name=name, choices=tuple(choices))


def _role(role: str, content: Union[Expr, str, None]) -> Role:
    return Role(role, as_expr(content) if content is not None else Text(""))


def system(content: Union[Expr, str, None] = None) -> Role:
    """A system message (rendered with the model's chat template on the server)."""
    return _role("system", content)


def user(content: Union[Expr, str, None] = None) -> Role:
    """A user message."""
    return _role("user", content)


def assistant(content: Union[Expr, str, None] = None) -> Role:
    """An assistant message; a `gen` or `select` inside it continues the assistant's reply."""
    return _role("assistant", content)


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


def image(path_or_bytes: Union[str, Path, bytes], mime: Optional[str] = None) -> Image:
    """An image for the current user message, from a file or its bytes (read now)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    elif isinstance(path_or_bytes, (str, Path)):
        path = Path(path_or_bytes)
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist")
        data = path.read_bytes()
        mime = mime or mimetypes.guess_type(path.name)[0]
    else:
        raise TypeError(f"image takes a path or bytes, not {type(path_or_bytes).__name__}")
    if not data:
        raise ValueError("the image is empty")
    if mime is None:
        is_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        mime = next((m for magic, m in _MAGIC if data.startswith(magic)), "image/webp" if is_webp else None)
    if mime is None or not mime.startswith("image/"):
        raise ValueError("cannot tell the image type: give mime= (e.g. 'image/png')")
    return Image(data=data, mime=mime)


def role_edge(role: str, edge: str) -> Role:
    """One edge ("begin" / "end") of a `with s.<role>():` block."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return Role(role, None, edge)

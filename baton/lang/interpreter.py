"""Running expressions against a state's data: what each one does to the prompt.

A state is in one of two modes, fixed by its first append:
- text: the prompt is the concatenation of everything appended; `gen` / `select` continue it
  (`/v1/completions`);
- chat: role messages (`system` / `user` / `assistant`, or `with s.user():` blocks). The
  server renders them with the model's chat template. Text must sit inside a role; `gen` /
  `select` inside an assistant message continue that reply, and outside any role they write
  the assistant's reply as a new message. Inside a user or system message they are refused:
  the model writes the assistant's turn.
Mixing the modes, opening a role inside another, or an image outside a user message is a
`UsageError`, which fails the step that did it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from baton.lang.backend import Backend, GenerateCall, Prompt, Sampling
from baton.lang.errors import UsageError
from baton.lang.ir import Expr, ExprList, Gen, Image, Role, Select, Text


@dataclass
class StateData:
    """Everything a state holds (only its runner's thread writes it)."""

    mode: Optional[str] = None
    """None until the first append, then "text" or "chat"."""
    text: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    open_role: Optional[str] = None
    """The role of the last message while it is still being written (a role block or expression)."""
    variables: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)

    def copy(self) -> "StateData":
        return StateData(self.mode, self.text, copy.deepcopy(self.messages), self.open_role,
                         dict(self.variables), copy.deepcopy(self.meta))

    def prompt(self) -> Prompt:
        """The prompt so far, as a backend takes it."""
        if self.mode == "chat":
            return Prompt(messages=tuple(copy.deepcopy(self.messages)), open_reply=self.open_role == "assistant")
        return Prompt(text=self.text)


class Interpreter:
    """Applies expressions to one state's data, calling the backend for `gen` and `select`."""

    def __init__(self, data: StateData, backend: Backend, defaults: Sampling) -> None:
        self.data = data
        self.backend = backend
        self.defaults = defaults

    def run(self, expr: Expr) -> None:
        if isinstance(expr, ExprList):
            for item in expr.items:
                self.run(item)
        elif isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Role):
            self._role(expr)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, Image):
            self._image(expr)
        else:
            raise TypeError(f"cannot run {type(expr).__name__}")

    # --- text and roles --------------------------------------------------------------
    def _append(self, text: str) -> None:
        data = self.data
        if data.mode is None:
            data.mode = "text"
        if data.mode == "text":
            data.text += text
            return
        if data.open_role is None:
            if not text:
                return
            raise UsageError("text outside a role in a chat program: put it in system(), user() or assistant()")
        message = data.messages[-1]
        if isinstance(message["content"], list):
            parts = message["content"]
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += text
            elif text:
                parts.append({"type": "text", "text": text})
        else:
            message["content"] += text

    def _role(self, expr: Role) -> None:
        if expr.edge == "end":
            if self.data.open_role != expr.role:
                raise UsageError(f"a {expr.role}() block ends but the open message is {self.data.open_role!r}")
            self.data.open_role = None
            return
        self._begin(expr.role)
        if expr.edge is None:
            self.run(expr.content)
            self.data.open_role = None

    def _begin(self, role: str) -> None:
        data = self.data
        if data.mode == "text" and data.text:
            raise UsageError("a role after plain text: a program uses roles throughout or not at all")
        if data.open_role is not None:
            raise UsageError(f"a {role}() message inside an open {data.open_role}() message")
        data.mode = "chat"
        data.messages.append({"role": role, "content": ""})
        data.open_role = role

    def _image(self, expr: Image) -> None:
        if self.data.mode != "chat" or self.data.open_role != "user":
            raise UsageError("an image goes inside a user message (user(...) or `with s.user():`)")
        message = self.data.messages[-1]
        if not isinstance(message["content"], list):
            text = message["content"]
            message["content"] = [{"type": "text", "text": text}] if text else []
        message["content"].append({"type": "image_url", "image_url": {"url": expr.data_url}})

    # --- calls -----------------------------------------------------------------------
    def _call_prompt(self, what: str) -> tuple[Prompt, bool]:
        """(the prompt for a gen / select, whether its result opens a new assistant message)."""
        data = self.data
        if data.mode is None:
            data.mode = "text"
        if data.mode == "text" or data.open_role == "assistant":
            return data.prompt(), False
        if data.open_role is not None:
            raise UsageError(f"{what} inside a {data.open_role}() message: the model writes the assistant's turn; "
                             f"put it in assistant(...) or after the {data.open_role} message")
        return data.prompt(), True

    def _record(self, name: Optional[str], text: str, new_message: bool, value: Any, meta: dict[str, Any]) -> None:
        if new_message:
            self.data.messages.append({"role": "assistant", "content": text})
        else:
            self._append(text)
        if name is not None:
            self.data.variables[name] = value
            self.data.meta[name] = meta

    def _gen(self, expr: Gen) -> None:
        prompt, new_message = self._call_prompt("gen")
        given = {k: v for k, v in vars(expr.sampling).items() if v is not None}
        sampling = replace(self.defaults, **given)
        result = self.backend.generate(GenerateCall(prompt, sampling, expr.regex, expr.json_schema))
        self._record(expr.name, result.text, new_message, result.text, result.meta)

    def _select(self, expr: Select) -> None:
        prompt, new_message = self._call_prompt("select")
        result = self.backend.select(prompt, expr.choices)
        self._record(expr.name, result.text, new_message, result.text, result.meta)

"""`ProgramState`: what a program builds (`s += ...`) and what its caller reads back.

Appending queues a step on the state's `StepRunner` and returns at once; reading
(`s["name"]`, `text()`, `messages()`, `sync()`) waits for the steps queued so far, within the
program's deadline, and raises the `ProgramError` of a step that failed.

`fork(n)` waits for the state, has the backend compute its prompt once (`cache_prefix`, so
the branches find it in the server's radix cache), and returns n copies, each with a runner
of its own: appending to them runs the branches in parallel. `ForkGroup.join()` waits for all.
Role blocks: `with s.user(): s += ...` (also `system`, `assistant`).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Union

from baton.lang.backend import Backend, Sampling
from baton.lang.errors import ProgramError
from baton.lang.interpreter import Interpreter, StateData
from baton.lang.ir import Expr, as_expr, role_edge
from baton.lang.runner import StepRunner


class ProgramState:
    """One run of a program: its prompt, variables and meta info."""

    def __init__(self, backend: Backend, defaults: Sampling, deadline: float, label: str,
                 data: Optional[StateData] = None) -> None:
        self.backend = backend
        self.defaults = defaults
        self.deadline = deadline
        """Monotonic time by which every step must have finished."""
        self.label = label
        self._data = data or StateData()
        self._runner = StepRunner(label)

    # --- building ----------------------------------------------------------------------
    def __iadd__(self, value: Union[Expr, str]) -> "ProgramState":
        expr = as_expr(value)
        interpreter = Interpreter(self._data, self.backend, self.defaults)
        self._runner.submit(expr.describe(), lambda: interpreter.run(expr))
        return self

    def system(self) -> "_RoleBlock":
        """`with s.system(): s += ...`: one system message."""
        return _RoleBlock(self, "system")

    def user(self) -> "_RoleBlock":
        """`with s.user(): s += ...`: one user message."""
        return _RoleBlock(self, "user")

    def assistant(self) -> "_RoleBlock":
        """`with s.assistant(): s += ...`: one assistant message (gen / select continue it)."""
        return _RoleBlock(self, "assistant")

    def fork(self, size: int = 1) -> "ForkGroup":
        """`size` copies of this state that run on their own (see the module doc)."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"fork size must be a positive int, not {size!r}")
        if size > 1:
            self._runner.submit(f"fork({size})", lambda: self.backend.cache_prefix(self._data.prompt()))
        self.sync()
        return ForkGroup(ProgramState(self.backend, self.defaults, self.deadline, f"{self.label} fork {i}",
                                      self._data.copy()) for i in range(size))

    def set_var(self, name: str, value: Any) -> None:
        """Set a variable (after the steps queued so far)."""
        self._runner.submit(f"set_var({name!r})", lambda: self._data.variables.__setitem__(name, value))

    # --- reading -----------------------------------------------------------------------
    def sync(self) -> None:
        """Wait for every step queued so far; raises the ProgramError of a failed step."""
        self._runner.wait(self.deadline)

    def error(self) -> Optional[ProgramError]:
        """The failed step's error (after `sync`), or None."""
        return self._runner.error

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def get_var(self, name: str) -> Any:
        """A variable's value (a gen's text, a select's choice), once the steps before it ran."""
        self.sync()
        if name not in self._data.variables:
            known = ", ".join(sorted(self._data.variables)) or "none"
            raise KeyError(f"{self.label} has no variable {name!r} (variables: {known})")
        return self._data.variables[name]

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """What the server said about a variable's call: token counts (cached ones included),
        finish reason; for a select the scores of every choice."""
        self.sync()
        if name not in self._data.meta:
            raise KeyError(f"{self.label} has no meta info for {name!r}")
        return self._data.meta[name]

    def variables(self) -> dict[str, Any]:
        """Every variable so far."""
        self.sync()
        return dict(self._data.variables)

    def text(self) -> str:
        """The prompt so far as the model sees it (a chat rendered by the server's template)."""
        self.sync()
        return self.backend.render(self._data.prompt())

    def messages(self) -> list[dict[str, Any]]:
        """The chat messages so far (empty for a text program)."""
        self.sync()
        return [dict(m) for m in self._data.messages]

    def __repr__(self) -> str:
        return f"ProgramState({self.label}, {self._runner.steps} steps)"


class ForkGroup(list):
    """The states `fork` returns (a list); `+=` appends to every one, `join()` waits for all."""

    def __iadd__(self, value: Union[Expr, str]) -> "ForkGroup":
        for state in self:
            state += value
        return self

    def join(self) -> None:
        """Wait for every fork; raises the first ProgramError."""
        for state in self:
            state.sync()


class _RoleBlock:
    """The context manager of `with s.user():` (and the other roles)."""

    def __init__(self, state: ProgramState, role: str) -> None:
        self.state, self.role = state, role

    def __enter__(self) -> ProgramState:
        self.state += role_edge(self.role, "begin")
        return self.state

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.state += role_edge(self.role, "end")


def deadline_after(seconds: float) -> float:
    """The monotonic deadline `seconds` from now."""
    return time.monotonic() + seconds

"""The frontend language's errors.

- `BackendError`: a call to the serving cluster failed (an HTTP error status with the
  server's OpenAI-style message, a refused connection, a timeout);
- `ProgramError`: a program step failed; its message names the program, the step (its number
  and expression, e.g. `step 3 gen('json_output')`) and the cause (`cause` keeps it);
- `UsageError`: a program used the state in a way the language does not allow (text outside a
  role in a chat program, a role opened inside another, ...), raised as the cause of a
  `ProgramError` for the step that did it.
"""
from __future__ import annotations

from typing import Optional


class BackendError(RuntimeError):
    """A backend call failed; `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, message: str, status: int = 0, code: Optional[str] = None,
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class UsageError(ValueError):
    """The program used the state in a way the language does not allow."""


class ProgramError(RuntimeError):
    """A program step failed."""

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f"{where} failed: {type(cause).__name__}: {cause}")
        self.where = where
        """The program and step, e.g. "extract: step 3 gen('json_output')"."""
        self.cause = cause

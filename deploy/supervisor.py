"""`baton up` keeps its cluster running: `Supervisor` restarts child processes that exit.

While `baton up` serves, every child (the router, each worker) that exits, crashed or killed,
is started again with the same command line, hence the same ports: the gateway comes back on
its port, and a worker comes back on its address, where the router's health loop finds it
SERVING again (with a new epoch) and sends it work. Restarts back off exponentially per
child, from `restart_backoff_s` doubling up to `restart_backoff_max_s`, so a child that dies
at once does not spin; a child that stayed up for `stable_after_s` starts again from the
initial backoff next time. Every exit and every restart is logged on stderr with the child's
name, exit code, pid and the wait. Only Ctrl-C / SIGTERM stops `baton up` (and then nothing is
restarted any more).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO


@dataclass(frozen=True)
class RestartPolicy:
    """How `baton up` restarts a child that exited."""

    restart_backoff_s: float = 1.0
    """Wait before the first restart of a child; doubles with each restart in a row."""
    restart_backoff_max_s: float = 30.0
    """The longest wait between two restarts of one child."""
    stable_after_s: float = 60.0
    """A child that ran this long before exiting is restarted after the initial wait again."""

    def __post_init__(self) -> None:
        if self.restart_backoff_s <= 0 or self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError("need 0 < restart_backoff_s <= restart_backoff_max_s")
        if self.stable_after_s <= 0:
            raise ValueError("stable_after_s must be positive")


@dataclass
class _Child:
    """What the supervisor remembers of one named child."""

    started_at: float
    backoff_s: float
    restarts: int = 0
    restart_at: float | None = None
    """When the exited child is due to start again (None while it runs)."""
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Restarts the exited processes of `procs` ((name, Popen) pairs, replaced in place).

    `respawn(name)` starts the named child again and returns its new process; call `check(now)`
    periodically (every 0.2 s in `baton up`)."""

    def __init__(self, procs: list[tuple[str, subprocess.Popen]], respawn: Callable[[str], subprocess.Popen],
                 policy: RestartPolicy = RestartPolicy(), now: float = 0.0, out: TextIO = sys.stderr) -> None:
        self.procs = procs
        self.respawn = respawn
        self.policy = policy
        self.out = out
        self.children = {name: _Child(started_at=now, backoff_s=policy.restart_backoff_s) for name, _ in procs}

    def check(self, now: float) -> None:
        """Notice exited children and restart those whose wait is over."""
        for position, (name, proc) in enumerate(self.procs):
            child = self.children.setdefault(name, _Child(started_at=now, backoff_s=self.policy.restart_backoff_s))
            if child.restart_at is None:
                code = proc.poll()
                if code is None:
                    continue
                if now - child.started_at >= self.policy.stable_after_s:
                    child.backoff_s = self.policy.restart_backoff_s
                child.exit_codes.append(code)
                child.restart_at = now + child.backoff_s
                self._log(f"{name} (pid {proc.pid}) exited with code {code}; restarting it in {child.backoff_s:g} s")
                continue
            if now < child.restart_at:
                continue
            try:
                new = self.respawn(name)
            except OSError as error:  # could not even start: try again after a longer wait
                self._schedule_retry(child, now, f"{name} could not be restarted ({error})")
                continue
            child.restarts += 1
            child.started_at, child.restart_at = now, None
            child.backoff_s = min(child.backoff_s * 2, self.policy.restart_backoff_max_s)
            self.procs[position] = (name, new)
            self._log(f"{name} restarted (pid {new.pid}, restart {child.restarts})")

    def _schedule_retry(self, child: _Child, now: float, message: str) -> None:
        child.backoff_s = min(child.backoff_s * 2, self.policy.restart_backoff_max_s)
        child.restart_at = now + child.backoff_s
        self._log(f"{message}; trying again in {child.backoff_s:g} s")

    def _log(self, message: str) -> None:
        print(f"baton up: {message}", file=self.out, flush=True)

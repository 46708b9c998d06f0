"""`Supervisor` (deploy/supervisor.py) with real child processes: a child that exits is restarted
after its backoff, the backoff doubles per restart in a row and is capped, a child that ran
long enough starts again from the initial backoff, a running child is left alone, and each exit
and restart is logged with its name, exit code and pid."""
from __future__ import annotations

import io
import subprocess

from baton.deploy.supervisor import RestartPolicy, Supervisor


def exits(code: int) -> subprocess.Popen:
    proc = subprocess.Popen(["sh", "-c", f"exit {code}"])
    proc.wait(10)
    return proc


def test_exited_child_is_restarted_with_capped_doubling_backoff():
    sleeper = subprocess.Popen(["sleep", "30"])
    procs = [("router", exits(3)), ("decode-0", sleeper)]
    started = []

    def respawn(name):
        started.append(name)
        return exits(4)
    out = io.StringIO()
    supervisor = Supervisor(procs, respawn, RestartPolicy(1.0, 4.0, stable_after_s=100.0), now=0.0, out=out)
    try:
        supervisor.check(0.0)  # noticed: restart due at 1.0
        assert "router (pid" in out.getvalue() and "exited with code 3; restarting it in 1 s" in out.getvalue()
        supervisor.check(0.9)
        assert started == []
        waits = []
        now = 1.0
        for _ in range(5):  # each restart exits at once: 1, 2, 4, 4, 4 s between restarts
            supervisor.check(now)
            assert started[-1] == "router"
            supervisor.check(now)  # notices the new exit
            waits.append(supervisor.children["router"].restart_at - now)
            now = supervisor.children["router"].restart_at
        assert waits == [2.0, 4.0, 4.0, 4.0, 4.0]
        assert len(started) == 5 and procs[1] == ("decode-0", sleeper)  # the running child was left alone
        assert procs[0][1].returncode == 4 and "router restarted (pid" in out.getvalue()
        assert supervisor.children["router"].exit_codes == [3, 4, 4, 4, 4, 4]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_child_that_ran_long_enough_restarts_after_the_initial_wait():
    procs = [("decode-0", exits(1))]
    supervisor = Supervisor(procs, lambda name: exits(1), RestartPolicy(1.0, 8.0, stable_after_s=10.0),
                            now=0.0, out=io.StringIO())
    supervisor.check(0.0)
    supervisor.check(1.0)  # restarted; next wait would be 2 s
    supervisor.check(50.0)  # it ran 49 s before exiting: the backoff starts over
    assert supervisor.children["decode-0"].restart_at == 51.0


def test_a_failed_respawn_is_retried_later():
    procs = [("router", exits(2))]
    calls = []

    def respawn(name):
        calls.append(name)
        if len(calls) == 1:
            raise OSError("no such file")
        return exits(0)
    out = io.StringIO()
    supervisor = Supervisor(procs, respawn, RestartPolicy(1.0, 30.0), now=0.0, out=out)
    supervisor.check(0.0)
    supervisor.check(1.0)
    assert "could not be restarted (no such file); trying again in 2 s" in out.getvalue()
    supervisor.check(3.0)
    assert calls == ["router", "router"] and "router restarted" in out.getvalue()

"""The host-step bench runs end to end on its tiny model: every row is the intended mix (the bench
asserts it), the phases add up to the host time, and the table has one line per row."""
from __future__ import annotations

import pytest

from baton.bench.host_step_cpu import main


def test_host_step_bench_rows(capsys):
    results = main(["--prefill-seqs", "1,3", "--decode-reqs", "2", "--prefill-tokens", "48", "--reps", "1",
                    "--warmup", "0", "--page-size", "4"])
    assert [(p, d) for p, d, _ in results] == [(1, 2), (3, 2)]
    for _, _, row in results:
        assert row["host"] > 0 and row["first"] > 0 and row["forward"] > 0
        assert row["sched"] + row["prep"] + row["sample"] + row["rest"] == pytest.approx(row["host"])
    out = capsys.readouterr().out
    assert out.count("\n| ") == 1 + len(results)  # the header and one line per row

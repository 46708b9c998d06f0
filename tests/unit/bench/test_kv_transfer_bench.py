"""The KV transfer benchmark runs end to end (--quick, both backends) and its rows add up."""
from __future__ import annotations

import pytest

from baton.bench.kv_transfer import main


def test_kv_transfer_bench_quick(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    result = main(["--quick", "--results", str(results)])

    rows = result["rows"]
    assert sorted((r["backend"], r["block_bytes"]) for r in rows) == sorted(
        (b, s) for b in ("memcpy", "tcp", "nixl") for s in (16 * 2**10, 256 * 2**10))
    for r in rows:
        assert r["writes"] >= 1 and r["samples"] >= 1 and r["verified"], r
        assert r["bytes"] == r["bytes_received"] == r["expected_bytes"] == r["writes"] * 16 * r["block_bytes"], r
        assert r["gbps"] > 0 and r["seconds"] > 0 and r["ratio"] > 0, r
        assert r["gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert 0 < r["write_p50_ms"] <= r["p50_ms"] + 1e-9 and 0 < r["p50_ms"] <= r["p90_ms"], r
    assert all(r["ratio"] == 1.0 for r in rows if r["backend"] == "memcpy")

    assert "| nixl | 256 KiB |" in capsys.readouterr().out
    text = results.read_text()
    assert "## KV transfer bandwidth" in text and result["command"] in text and "torch" in text and "UTC" in text

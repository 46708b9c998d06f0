"""The KV transfer benchmark runs end to end (--quick, both backends) and its rows add up; its
--device cuda parts that need no GPU (flags, reference naming, report, skipping) behave."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from baton.bench import kv_transfer
from baton.bench.kv_transfer import layout_for, main, parse_args, pairs_for, pattern_cache, verify
from baton.bench.kv_transfer_report import summary, table
from baton.services.engine.kv.kv_cache import KVCache


def test_kv_transfer_bench_quick(tmp_path, capsys):
    results, out = tmp_path / "RESULTS.md", tmp_path / "kv.json"
    result = main(["--quick", "--results", str(results), "--json", str(out)])

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
    assert result["device"] == "cpu" and result["reference"] == "memcpy" and result["skipped"] == []

    assert "| nixl | 256 KiB |" in capsys.readouterr().out
    text = results.read_text()
    assert "## KV transfer bandwidth" in text and result["command"] in text and "torch" in text and "UTC" in text
    assert "x memcpy" in text and "baton.bench.kv_transfer" in result["command"]
    assert json.loads(out.read_text()) == result


def test_verify_checks_written_and_untouched_blocks():
    layout, pairs = layout_for(16 * 2**10, 4), pairs_for(4)
    src, dst, n = pattern_cache(layout), KVCache(layout, torch.device("cpu")), layout.num_blocks
    assert not verify(dst, pairs)  # nothing written yet
    for s, d in pairs:
        for a, b in ((src.keys[0], dst.keys[0]), (src.values[0], dst.values[0])):
            b.view(n, -1)[d] = a.view(n, -1)[s]
    assert verify(dst, pairs)
    untouched = next(b for b in range(n) if b not in {d for _, d in pairs})
    dst.values[0].view(n, -1)[untouched, 0] = 1.0
    assert not verify(dst, pairs)


def test_device_flag_defaults():
    cpu = parse_args([])
    assert cpu.device == "cpu" and cpu.total_mib == 64
    assert parse_args(["--total-mib", "8"]).total_mib == 8
    assert parse_args(["--quick", "--device", "cpu"]).total_mib == 4


def test_cuda_device_without_a_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args(["--device", "cuda"])
    assert args.device == "cuda" and args.total_mib == 1024


def _row(backend: str, size: int, gbps: float, ratio: float) -> dict:
    return {"backend": backend, "block_bytes": size, "gbps": gbps, "ratio": ratio, "p50_ms": 0.2, "p90_ms": 0.3,
            "write_p50_ms": 0.1, "bytes": 64 * 2**20}


def test_cuda_report_names_the_device_copy_reference():
    rows = [_row("nixl", 2**20, 100.0, 0.5), _row("d2d", 2**20, 200.0, 1.0), _row("tcp", 2**20, 10.0, 0.05)]
    text = table(rows, "cuda")
    assert "| x d2d |" in text and text.splitlines()[2].startswith("| d2d | 1 MiB |")
    args = SimpleNamespace(device="cuda", backend_list=["tcp", "nixl"], size_list=[2**20], blocks=16)
    line = summary(rows, args)
    assert line.startswith("Between two processes on one GPU") and "nixl 0.50-0.50x" in line and "tcp 0.05" in line
    assert "x memcpy" in table(rows[:1], "cpu")


def test_missing_modules_skip_their_backends(monkeypatch, tmp_path, capsys):
    real = kv_transfer.importlib.util.find_spec
    monkeypatch.setattr(kv_transfer.importlib.util, "find_spec", lambda name: None if name == "zmq" else real(name))
    assert "pyzmq" in kv_transfer.unavailable("tcp") and "pyzmq" in kv_transfer.unavailable("nixl")
    results = tmp_path / "RESULTS.md"
    result = main(["--quick", "--results", str(results)])  # --quick: 16K and 256K
    assert [r["backend"] for r in result["rows"]] == ["memcpy", "memcpy"]
    assert all(r["verified"] and r["ratio"] == 1.0 for r in result["rows"])
    assert len(result["skipped"]) == 2 and "skipped tcp: pyzmq" in capsys.readouterr().err
    assert "- Skipped: nixl: pyzmq" in results.read_text()
    assert "nothing (no backend ran)" in results.read_text()

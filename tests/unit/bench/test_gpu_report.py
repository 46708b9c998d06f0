"""The GPU benchmark's table, rendered from results saved on the device machine.

Uses the same-lease H100 result files of bench/results/ (Baton's gpu_engine.json and
vLLM's peer.json from one lease): the vLLM ratios must say "same run" only when the
result carries vLLM's figures from that lease, and never compare another GPU's vLLM
figure to this GPU's limit.
"""
from __future__ import annotations

import json
from pathlib import Path

from baton.bench.gpu_report import report, vllm_reference

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results" / "gpu_same_run_h100"


def test_report_uses_the_same_lease_vllm_figures() -> None:
    res = json.loads((RESULTS / "gpu_engine.json").read_text())
    table = report(res)
    assert "| (a) batch-1 decode, CUDA graphs | 174.0 tok/s | limit 186.3 tok/s" in table
    assert "93.4%" in table
    assert "vLLM 0.26 9355 (same run) | 1.09x" in table
    assert "transformers paged|sdpa 898 | 12.0x" in table
    assert "(a) vLLM 0.26 batch-1 decode" not in table  # this file predates the stored (a) reference


def test_a_row_for_vllm_only_from_the_same_lease() -> None:
    res = json.loads((RESULTS / "gpu_engine.json").read_text())
    peer = json.loads((RESULTS / "peer.json").read_text())["vllm"]
    res["a"]["vllm"] = {"source": "same run", "bs1_tok_s": peer["bs1_tok_s"]}
    assert "| (a) vLLM 0.26 batch-1 decode (same run) | 153.9 tok/s | limit 186.3 tok/s | 82.6% |" in report(res)
    res["a"]["vllm"] = {"source": "H200, peer README, not this run", "bs1_tok_s": 203.8}
    assert "(a) vLLM 0.26 batch-1 decode" not in report(res)


def test_vllm_reference_reads_peer_json_from_out(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert vllm_reference()["source"].startswith("H200, peer README")
    (tmp_path / "peer.json").write_text((RESULTS / "peer.json").read_text())
    ref = vllm_reference()
    assert ref["source"] == "same run"
    assert round(ref["w1_out_tok_s"]) == 9355 and round(ref["bs1_tok_s"], 1) == 153.9

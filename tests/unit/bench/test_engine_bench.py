"""The engine benchmark runs end to end on a tiny model and returns a consistent result."""
from __future__ import annotations

import pytest

from baton.bench.engine import main
from tests.helpers.tiny_models import make_tiny_model


def test_engine_bench_on_tiny_model(tmp_path, capsys):
    folder = make_tiny_model("llama", tmp_path / "model")
    results = tmp_path / "RESULTS.md"
    result = main(["--model", str(folder), "--num-prompts", "4", "--output-len", "4",
                   "--min-input", "4", "--max-input", "12", "--threads", "1", "--results", str(results)])

    expected = 4 * 4
    assert result["workload"]["expected_output_tokens"] == expected
    for side in ("baton", "hf"):
        s = result[side]
        assert s["output_tokens"] == expected
        assert s["seconds"] > 0 and s["output_tps"] > 0 and s["total_tps"] > s["output_tps"]
        assert s["output_tps"] == pytest.approx(expected / s["seconds"])
    assert result["ratio"] == pytest.approx(result["baton"]["output_tps"] / result["hf"]["output_tps"])
    assert result["correctness"] == {"checked": 4, "matched": 4, "matches": [True] * 4}

    assert "| Baton |" in capsys.readouterr().out
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert result["command"] in text and "torch" in text and "UTC" in text

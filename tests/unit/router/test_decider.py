"""DisaggDecider thresholds, and the router package's import boundary."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from baton.router.decider import DisaggDecider

ROUTER_DIR = Path(__file__).resolve().parents[3] / "router"


def test_disaggregates_only_above_the_uncached_threshold() -> None:
    decider = DisaggDecider()
    assert decider.decode_only_threshold == 256
    assert decider.decide([0] * 257, 0, have_prefill=True)
    assert not decider.decide([0] * 256, 0, have_prefill=True)
    assert not decider.decide([0] * 300, 100, have_prefill=True)  # 200 uncached
    assert decider.decide([0] * 1000, 700, have_prefill=True)     # 300 uncached
    assert not decider.decide([], 0, have_prefill=True)


def test_no_prefill_worker_or_n_above_one_means_decode_only() -> None:
    decider = DisaggDecider(decode_only_threshold=10)
    long_prompt = [1] * 5000
    assert not decider.decide(long_prompt, 0, have_prefill=False)
    assert not decider.decide(long_prompt, 0, have_prefill=True, n=2)
    assert decider.decide(long_prompt, 0, have_prefill=True, n=1)


def test_prompt_logprobs_mean_decode_only() -> None:
    decider = DisaggDecider(decode_only_threshold=10)
    assert not decider.decide([1] * 5000, 0, have_prefill=True, prompt_logprobs=True)
    assert decider.decide([1] * 5000, 0, have_prefill=True, prompt_logprobs=False)


def test_a_backed_up_prefill_tier_means_decode_only() -> None:
    decider = DisaggDecider(decode_only_threshold=10, prefill_backlog_limit=1000)
    prompt = [1] * 5000
    assert decider.decide(prompt, 0, have_prefill=True, prefill_backlog_tokens=1000)
    assert not decider.decide(prompt, 0, have_prefill=True, prefill_backlog_tokens=1001)
    never = DisaggDecider(decode_only_threshold=10, prefill_backlog_limit=0)
    assert never.decide(prompt, 0, have_prefill=True, prefill_backlog_tokens=10**9)
    assert DisaggDecider().prefill_backlog_limit == 16384
    with pytest.raises(ValueError, match="prefill_backlog_limit"):
        DisaggDecider(prefill_backlog_limit=-1)


def test_cached_estimate_is_clamped() -> None:
    decider = DisaggDecider(decode_only_threshold=0)
    assert DisaggDecider.uncached_tokens([1] * 10, 50) == 0
    assert DisaggDecider.uncached_tokens([1] * 10, -5) == 10
    assert not decider.decide([1] * 10, 50, have_prefill=True)
    assert decider.decide([1] * 10, 9, have_prefill=True)


def test_threshold_is_validated() -> None:
    with pytest.raises(ValueError, match="decode_only_threshold"):
        DisaggDecider(decode_only_threshold=-1)


def test_router_never_imports_services() -> None:
    offenders = []
    for path in sorted(ROUTER_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "services"]
    assert not offenders, offenders

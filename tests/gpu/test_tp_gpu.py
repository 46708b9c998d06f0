"""Tensor parallelism on CUDA over NCCL (skipped without 2 GPUs): TP=2 equals TP=1 in float32.

Rank 0 runs in this process on cuda:0, rank 1 is a child process on cuda:1. float32 greedy outputs
equal the TP=1 engine's token for token (fused Triton path, decode CUDA graphs (NCCL collectives
captured) and eager, overlap scheduling on and off, chunked prefill, a tied-embedding Qwen2 with
q/k/v biases and an untied Llama); bfloat16 runs with graphs (GEMV path on each rank's shard); a
killed rank makes rank 0 exit fast while NCCL is in flight.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("tensor parallelism needs 2 GPUs", allow_module_level=True)

from baton.services.engine import LLM, SamplingParams  # noqa: E402
from baton.services.engine.parallel.launch import RANK_FAILED_EXIT_CODE  # noqa: E402
from tests.helpers.tiny_models import VOCAB, make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OPTIONS = dict(device="cuda", kv_cache_tokens=4096, page_size=16, chunked_prefill_size=32)


def prompts(seed: int, count: int = 6, longest: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, longest] + [rng.randrange(2, longest) for _ in range(count - 3)]
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: make_tiny_model(name, tmp_path_factory.mktemp(name)) for name in ("llama", "qwen2")}


def greedy(llm: LLM, batch: list[list[int]], max_new: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(batch, params)]


@pytest.fixture(scope="module")
def expected(folders):
    """TP=1 float32 greedy outputs per family (computed once; the engine's own GPU tests show they do not
    depend on graphs or overlap)."""
    out = {}
    for family, folder in folders.items():
        one = LLM(str(folder), dtype="float32", max_running_requests=16, **OPTIONS)
        out[family] = greedy(one, prompts(seed=2))
        del one
        torch.cuda.empty_cache()
    return out


CASES = [("llama", True, True), ("llama", False, False), ("qwen2", True, True)]
"""(family, decode graphs, overlap scheduling): graphs + overlap is the default; eager + sync the plainest."""


@pytest.mark.parametrize("family,graphs,overlap", CASES, ids=["llama-graphs-overlap", "llama-eager-sync",
                                                            "qwen2-graphs-overlap"])
def test_float32_tp2_equals_tp1(family, graphs, overlap, folders, expected):
    options = dict(OPTIONS, dtype="float32", disable_overlap_schedule=not overlap, disable_cuda_graph=not graphs,
                   max_running_requests=16)
    two = LLM(str(folders[family]), tp_size=2, **options)
    try:
        assert two.engine.runner.device == torch.device("cuda", 0)
        assert bool(two.engine.runner.graph_bs) == graphs
        assert greedy(two, prompts(seed=2)) == expected[family]
        two.engine.check_idle_integrity()
    finally:
        two.engine.runner.close()


def test_bfloat16_tp2_runs_with_graphs(folders):
    """bf16 (the GEMV path on each shard) with decode graphs: it runs and yields valid tokens (bf16
    graph and eager steps agree within rounding only, so tokens are not compared)."""
    two = LLM(str(folders["llama"]), tp_size=2, dtype="bfloat16", max_running_requests=16, **OPTIONS)
    try:
        assert two.engine.runner.graph_bs
        out = greedy(two, prompts(seed=4), max_new=16)
        assert all(len(tokens) == 16 and all(0 <= t < VOCAB for t in tokens) for tokens in out)
        two.engine.check_idle_integrity()
    finally:
        two.engine.runner.close()


SCRIPT = """
import sys
from baton.services.engine import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cuda", dtype="float32", tp_size=2, kv_cache_tokens=4096, max_running_requests=8)
print("pids", *llm.engine.runner.rank_pids, flush=True)
params = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
while True:
    llm.generate([[5, 6, 7], [8, 9, 10, 11]] * 4, params)
"""


def test_killed_rank_stops_rank_0_fast_over_nccl(folders):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(folders["llama"])], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("pids"), proc.stderr.read() if proc.poll() is not None else line
        time.sleep(2.0)
        killed = time.monotonic()
        os.kill(int(line.split()[1]), signal.SIGKILL)
        code = proc.wait(timeout=30)
        assert code == RANK_FAILED_EXIT_CODE and time.monotonic() - killed < 5.0
    finally:
        proc.kill()

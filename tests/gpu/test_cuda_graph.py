"""CUDA-graph decode against eager decode, on the GPU.

For every captured batch size (and sizes in between, which replay the next size up with
padding rows), one decode step through the graph gives the same logits as the same step
run eagerly: float32 to rounding of the split-K order (the graph's decode kernel uses a
fixed split count) with identical argmax, bfloat16 within a bf16 tolerance. End to end,
greedy generation with graphs equals generation with `disable_cuda_graph=True`.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine import LLM, SamplingParams  # noqa: E402
from baton.services.engine.request import Request  # noqa: E402
from baton.services.engine.scheduling.scheduler import ScheduledItem  # noqa: E402
from tests.helpers.tiny_models import VOCAB, make_tiny_model  # noqa: E402

MAX_BS = 16
CAPTURED = [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama_graph"))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_eager_for_every_captured_size(folder, dtype):
    llm = LLM(model=str(folder), device="cuda", dtype=dtype, kv_cache_tokens=16384, page_size=16,
              cuda_graph_max_bs=MAX_BS)
    runner, pool = llm.engine.runner, llm.engine.pool
    assert runner.use_graphs and runner.graph_bs == CAPTURED
    rng = random.Random(3)
    free = iter(range(pool.num_blocks))
    requests = []
    for i in range(MAX_BS):
        length = rng.choice([3, 17, 40, 130, 300, 700])
        req = Request(request_id=f"r{i}", parent_id=f"r{i}", index=0,
                      prompt_token_ids=[rng.randrange(3, VOCAB) for _ in range(length)],
                      params=SamplingParams(max_tokens=8), arrival=i)
        req.block_table = [next(free) for _ in range((length + 8 + 15) // 16)]
        runner.execute([ScheduledItem(req, 0, length)])  # prefill (eager)
        req.num_computed_tokens = length
        requests.append(req)
    for size in sorted(set(CAPTURED + [3, 5, 13])):
        batch = requests[:size]
        for req in batch:
            req.output_token_ids.append(rng.randrange(3, VOCAB))
        items = [ScheduledItem(req, req.num_computed_tokens, 1) for req in batch]
        runner.use_graphs = False
        eager = runner.execute(items)
        runner.use_graphs = True
        graph = runner.execute(items)
        assert graph.shape == eager.shape == (size, VOCAB)
        assert torch.isfinite(graph).all()
        err = relative_error(graph, eager)
        print(f"{dtype} batch {size} (graph {min(b for b in CAPTURED if b >= size)}): relative error {err:.2e}")
        if dtype == "float32":
            assert err < 1e-5, f"batch {size}: relative error {err:.2e}"
            assert torch.equal(graph.argmax(-1), eager.argmax(-1)), f"batch {size}: greedy tokens differ"
        else:
            assert err < 2e-2, f"batch {size}: relative error {err:.2e}"
        for req in batch:
            req.num_computed_tokens += 1


def test_greedy_generation_with_graphs_equals_without(folder):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 90))] for _ in range(13)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for disabled in (False, True):
        llm = LLM(model=str(folder), device="cuda", dtype="float32", kv_cache_tokens=8192, page_size=16,
                  cuda_graph_max_bs=MAX_BS, disable_cuda_graph=disabled)
        assert llm.engine.runner.use_graphs is not disabled
        outputs[disabled] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        outputs[disabled].append(llm.generate([prompts[0]], params)[0].outputs[0].token_ids)  # batch 1
        del llm
        torch.cuda.empty_cache()
    assert outputs[False] == outputs[True]

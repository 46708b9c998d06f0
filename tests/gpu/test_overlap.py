"""Overlap scheduling on CUDA: the default engine (host schedules step N+1 while the GPU runs
step N, sampled ids stay on the GPU, graphs gather them) gives exactly the outputs of
`disable_overlap_schedule=True`, greedy and seeded, for a batch with mixed prompt lengths,
max_tokens, stop ids and n = 2 (more sequences than the largest graph, so graph and eager
steps mix), with CUDA graphs and without, and under preemption; every block comes back.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine import LLM  # noqa: E402
from tests.helpers.tiny_models import make_tiny_model  # noqa: E402
from tests.unit.engine.test_overlap import workload  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama_overlap"))


def generate(llm: LLM, prompts, params):
    outputs = llm.generate(prompts, params)
    llm.engine.flush()
    llm.engine.check_idle_integrity()
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


@pytest.mark.parametrize("options", [
    dict(),
    dict(disable_cuda_graph=True),
    dict(page_size=4, kv_cache_tokens=320, max_running_requests=12),  # tight: preemption
    dict(skip_tokenizer_init=False, page_size=8),  # detokenized outputs
], ids=["graphs", "eager", "preempt", "text"])
def test_overlap_equals_synchronous_on_cuda(folder, options):
    options = dict(model=str(folder), device="cuda", dtype="float32", kv_cache_tokens=8192, page_size=16,
                   cuda_graph_max_bs=16, skip_tokenizer_init=True) | options
    prompts, params = workload(seed=3, count=24)
    results = {}
    for disabled in (True, False):
        llm = LLM(disable_overlap_schedule=disabled, **options)
        assert llm.engine.overlap_schedule is not disabled
        results[disabled] = generate(llm, prompts, params)
        results[disabled].append(generate(llm, prompts[:1], params[:1]))  # batch of one
        if not disabled:
            assert llm.engine.num_overlapped_steps > 0
            assert llm.engine.runner.use_graphs is not options.get("disable_cuda_graph", False)
        del llm
        torch.cuda.empty_cache()
    assert any(c[1] == "stop" for o in results[True][:-1] for c in o)
    assert results[False] == results[True]

"""Piecewise CUDA graphs (everything but attention replayed) against eager prefill and mixed steps.

Steps of every kind the piecewise graphs take (one prefill, a chunk after a cached prefix,
several prefill chunks with decode tokens mixed in, sizes on and between the captured
buckets) give the same logits through the graphs as eagerly: float32 to rounding with
identical argmax, bfloat16 within a bf16 tolerance. End to end, greedy generation with
piecewise graphs (small chunks, so most steps are mixed) equals generation without them,
and the graphs really ran.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine import LLM, SamplingParams  # noqa: E402
from baton.services.engine.request import Request  # noqa: E402
from baton.services.engine.scheduling.scheduler import ScheduledItem  # noqa: E402
from baton.services.engine.runner.piecewise_graph import piecewise_buckets  # noqa: E402
from tests.helpers.tiny_models import VOCAB, make_tiny_model  # noqa: E402

MAX_TOKENS = 256


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama_piecewise"))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _request(rng: random.Random, i: int, length: int, free) -> Request:
    req = Request(request_id=f"r{i}", parent_id=f"r{i}", index=0,
                  prompt_token_ids=[rng.randrange(3, VOCAB) for _ in range(length)],
                  params=SamplingParams(max_tokens=8), arrival=i)
    req.block_table = [next(free) for _ in range((length + 8 + 15) // 16)]
    return req


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_piecewise_steps_equal_eager(folder, dtype):
    llm = LLM(model=str(folder), device="cuda", dtype=dtype, kv_cache_tokens=16384, page_size=16,
              piecewise_cuda_graph_max_tokens=MAX_TOKENS)
    runner, pool, cache = llm.engine.runner, llm.engine.pool, llm.engine.kv_cache
    assert runner.piecewise is not None and runner.piecewise.buckets == piecewise_buckets(MAX_TOKENS)
    assert runner.piecewise.buckets == [16, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    rng = random.Random(7)
    free = iter(range(pool.num_blocks))
    decoding = [_request(rng, 100 + i, rng.choice([5, 40, 90]), free) for i in range(6)]
    for req in decoding:  # give them a cache to decode against (eager prefill)
        saved, runner.piecewise = runner.piecewise, None
        runner.execute([ScheduledItem(req, 0, len(req.prompt_token_ids))])
        runner.piecewise = saved
        req.num_computed_tokens = len(req.prompt_token_ids)
    steps = []
    for n in (16, 17, 100, 256):  # one prefill of n tokens
        steps.append([ScheduledItem(_request(rng, len(steps), n, free), 0, n)])
    chunked = _request(rng, 50, 200, free)  # a chunk after a prefix computed by an earlier step
    steps.append([ScheduledItem(chunked, 0, 120)])
    steps.append([ScheduledItem(chunked, 120, 80)])
    mixed = [ScheduledItem(_request(rng, 60 + i, n, free), 0, n) for i, n in enumerate((30, 7, 61))]
    steps.append(mixed + [ScheduledItem(r, r.num_computed_tokens, 1) for r in decoding])
    for k, items in enumerate(steps):
        for item in items:
            if item.num_tokens == 1:
                item.request.output_token_ids.append(rng.randrange(3, VOCAB))
        saved, runner.piecewise = runner.piecewise, None
        eager = runner.execute(items)
        eager_kv = [t.clone() for t in (*cache.keys, *cache.values)]
        runner.piecewise = saved
        before = saved.replays
        graph = runner.execute(items)
        assert saved.replays == before + 1, f"step {k} did not replay the piecewise graphs"
        kv_err = max(relative_error(t, e) for t, e in zip((*cache.keys, *cache.values), eager_kv))
        assert kv_err < (1e-5 if dtype == "float32" else 1e-2), f"step {k}: stored K/V differ ({kv_err:.2e})"
        assert graph.shape == eager.shape and torch.isfinite(graph).all()
        if eager.numel() == 0:  # a chunk that samples nothing: its K/V above is what it produced
            continue
        err = relative_error(graph, eager)
        tokens = sum(i.num_tokens for i in items)
        print(f"{dtype} step {k} ({tokens} tokens): relative error {err:.2e}")
        if dtype == "float32":
            assert err < 1e-4, f"step {k}: relative error {err:.2e}"
            assert torch.equal(graph.argmax(-1), eager.argmax(-1)), f"step {k}: greedy tokens differ"
        else:
            assert err < 2e-2, f"step {k}: relative error {err:.2e}"
        for item in items:
            if item.num_tokens == 1:
                item.request.num_computed_tokens += 1


def test_greedy_generation_with_piecewise_graphs_equals_without(folder):
    rng = random.Random(11)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 300))] for _ in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outputs, replays = {}, {}
    for tokens in (MAX_TOKENS, 0):
        llm = LLM(model=str(folder), device="cuda", dtype="float32", kv_cache_tokens=8192, page_size=16,
                  chunked_prefill_size=64, max_num_batched_tokens=128, piecewise_cuda_graph_max_tokens=tokens)
        piecewise = llm.engine.runner.piecewise
        assert (piecewise is not None) is bool(tokens)
        before = piecewise.replays if piecewise is not None else 0  # the start-up warm-up replays them too
        outputs[tokens] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        replays[tokens] = (piecewise.replays if piecewise is not None else 0) - before
        del llm
        torch.cuda.empty_cache()
    assert replays[MAX_TOKENS] > 0
    assert outputs[MAX_TOKENS] == outputs[0]

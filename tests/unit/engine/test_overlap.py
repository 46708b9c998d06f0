"""Overlap scheduling's bookkeeping on CPU: the engine forced into overlapped steps
(placeholder tokens, inputs gathered from the previous step's sampled ids, outputs one step
late, the extra token of a finished request discarded) gives exactly the synchronous
engine's outputs, and every block comes back. On CPU nothing actually overlaps (the device
is the host); tests/gpu/test_overlap.py runs the same on CUDA with graphs.
"""
from __future__ import annotations

import random

import pytest

from baton.services.engine import LLM, SamplingParams
from tests.helpers.tiny_models import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("overlap"))


def workload(seed: int = 0, count: int = 10):
    """Mixed prompt lengths, max_tokens, sampling modes, bans and stop ids."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(count):
        prompts.append([rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 5, 17, 33, 64, 90]))])
        kind = i % 5
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 30), ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=rng.randrange(1, 30),
                                         ignore_eos=True))
        elif kind == 2:  # stops at the first of many stop ids (EOS-like), but not before min_tokens
            params.append(SamplingParams(temperature=0.0, max_tokens=40, min_tokens=3,
                                         stop_token_ids=tuple(range(3, VOCAB, 9))))
        elif kind == 3:
            params.append(SamplingParams(temperature=1.0, top_k=20, seed=7 + i, max_tokens=25,
                                         stop_token_ids=tuple(range(5, VOCAB, 11))))
        else:
            params.append(SamplingParams(temperature=0.7, seed=i, n=2, max_tokens=rng.randrange(2, 20),
                                         ignore_eos=True))
    return prompts, params


def run(llm: LLM, prompts, params, overlap: bool):
    llm.engine.overlap_schedule = overlap
    outputs = llm.generate(prompts, params)
    result = [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]
    llm.engine.flush()
    llm.engine.check_idle_integrity()
    return result


@pytest.mark.parametrize("options", [
    dict(),
    dict(page_size=4, chunked_prefill_size=16, max_num_batched_tokens=40),
    dict(page_size=4, kv_cache_tokens=160, max_running_requests=6),  # tight: preemption
], ids=["default", "chunked", "preempt"])
def test_overlap_equals_synchronous(folder, options):
    options = dict(model=str(folder), page_size=16, kv_cache_tokens=4096, num_threads=1,
                   skip_tokenizer_init=True) | options
    llm = LLM(**options)
    prompts, params = workload()
    want = run(llm, prompts, params, overlap=False)
    got = run(llm, prompts, params, overlap=True)
    assert got == want
    assert any(c[1] == "stop" for o in want for c in o), "the workload should stop on a stop id"
    assert run(llm, prompts[:1], params[:1], overlap=True) == want[:1]  # batch of one


def test_overlap_with_text_and_host_state_requests(folder):
    """Detokenized requests overlap; a logprobs or penalty request makes its steps synchronous."""
    llm = LLM(model=str(folder), page_size=8, kv_cache_tokens=2048, num_threads=1)
    prompts, params = workload(seed=1, count=6)
    params[1] = SamplingParams(temperature=0.0, max_tokens=9, logprobs=2, ignore_eos=True)
    params[3] = SamplingParams(temperature=0.8, seed=5, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)
    want = run(llm, prompts, params, overlap=False)
    got = run(llm, prompts, params, overlap=True)
    assert got == want


def test_abort_while_a_step_is_pending(folder):
    llm = LLM(model=str(folder), page_size=4, kv_cache_tokens=1024, num_threads=1, skip_tokenizer_init=True)
    engine = llm.engine
    engine.overlap_schedule = True
    for i in range(4):
        engine.add_request(f"r{i}", [3 + i] * (5 + i), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._pending is not None
    engine.abort("r1")
    engine.abort("r2")
    tokens = {}
    while engine.has_unfinished():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
    assert "r1" not in tokens and "r2" not in tokens
    engine.flush()
    engine.check_idle_integrity()

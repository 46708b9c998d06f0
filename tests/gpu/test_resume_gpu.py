"""A resumed completion (a migrated stream's new worker, services/engine/resume.py) continues
exactly as the unbroken run on CUDA, overlap scheduling on: seeded sampling (the generator is
on the CPU, so resuming at token k makes the draw an unbroken stream makes), penalties (their
steps run synchronously), a stop string held back across the cut, and n = 2."""
from __future__ import annotations

import pytest

from baton.services.engine import LLM, SamplingParams
from baton.services.engine.resume import ResumedCompletion
from tests.helpers.tiny_models import make_tiny_model

PROMPT = [5, 17, 42, 99, 7, 256, 31]
KINDS = {
    "seeded": SamplingParams(max_tokens=48, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
    "seeded_penalties": SamplingParams(max_tokens=48, temperature=0.8, seed=9, frequency_penalty=1.0,
                                       presence_penalty=0.5, repetition_penalty=1.2, ignore_eos=True),
    "greedy": SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
    "n2_seeded": SamplingParams(n=2, max_tokens=32, temperature=1.0, seed=2**64 - 1, ignore_eos=True),
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = make_tiny_model("llama", tmp_path_factory.mktemp("resume-gpu"))
    llm = LLM(model=str(folder), device="cuda", dtype="float32", page_size=16, kv_cache_tokens=8192)
    assert llm.engine.overlap_schedule
    return llm


def run(llm, request_id, params, resume=None):
    engine = llm.engine
    engine.add_request(request_id, PROMPT, params, resume=resume)
    out: dict[int, list] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            entry = out.setdefault(delta.index, [[], ""])
            entry[0] += delta.new_token_ids
            entry[1] += delta.new_text
    for delta in engine.flush():
        entry = out.setdefault(delta.index, [[], ""])
        entry[0] += delta.new_token_ids
        entry[1] += delta.new_text
    return out


@pytest.mark.parametrize("name", sorted(KINDS))
def test_resume_equals_unbroken_run_on_cuda(llm, name):
    params = KINDS[name]
    unbroken = run(llm, f"{name}-unbroken", params)
    for k in (1, 9, 20):
        resumed = run(llm, f"{name}-{k}", params,
                      resume=[ResumedCompletion(i, tuple(unbroken[i][0][:k])) for i in range(params.n)])
        for i in range(params.n):
            assert unbroken[i][0][:k] + resumed[i][0] == unbroken[i][0], (name, k, i)
    llm.engine.check_idle_integrity()

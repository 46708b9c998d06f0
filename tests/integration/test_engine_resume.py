"""Engine-level resume (what a migrated stream's new worker does): a completion resumed at token
k with the k tokens it already produced continues exactly as the unbroken run did, token for
token and text for text, for every kind of sampling state a request carries: JSON schema,
regex and EBNF grammars (mid-document), frequency / presence / repetition penalties, seeded
sampling (temperature, top-k / top-p), min_tokens, text held back for a partial stop string,
and n = 2 with one completion already finished."""
from __future__ import annotations

import json

import pytest

from baton.services.engine import LLM
from baton.services.engine.output.detokenizer import IncrementalDetokenizer
from baton.services.engine.output.stop_checker import StopStringChecker
from baton.services.engine.resume import ResumedCompletion
from baton.services.engine.sampling_params import SamplingParams, StructuredOutputParams
from tests.helpers.text_tiny_model import make_text_tiny_model

PROMPT = [1, 9906, 11, 638, 314, 253, 1345, 30]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "tags"]}

KINDS = {
    "json_schema_seeded": SamplingParams(max_tokens=48, temperature=0.9, seed=11,
                                         structured_output=StructuredOutputParams(json=json.dumps(SCHEMA))),
    "json_schema_greedy": SamplingParams(max_tokens=48, temperature=0.0,
                                         structured_output=StructuredOutputParams(json=json.dumps(SCHEMA))),
    "regex": SamplingParams(max_tokens=40, temperature=0.8, seed=3,
                            structured_output=StructuredOutputParams(regex=r"[a-z]{3,9}( [a-z]{2,8}){12,16}\.")),
    "choice_ebnf": SamplingParams(max_tokens=40, min_tokens=25, temperature=1.0, seed=5,
                                  structured_output=StructuredOutputParams(
        grammar='root ::= ("alpha" | "beta" | "gamma") (", " ("alpha" | "beta" | "gamma"))*')),
    "penalties": SamplingParams(max_tokens=40, temperature=0.7, seed=8, frequency_penalty=1.5,
                                presence_penalty=0.8, repetition_penalty=1.3, ignore_eos=True),
    "greedy_penalties": SamplingParams(max_tokens=40, temperature=0.0, frequency_penalty=2.0, ignore_eos=True),
    "seeded_top_k_top_p": SamplingParams(max_tokens=40, temperature=1.2, top_k=50, top_p=0.9, seed=2**64 - 1,
                                         ignore_eos=True),
    "min_tokens": SamplingParams(max_tokens=40, min_tokens=30, temperature=1.0, seed=4),
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory, default_model_path):
    folder = make_text_tiny_model(tmp_path_factory.mktemp("text-tiny"), default_model_path)
    return LLM(model=str(folder), page_size=4, kv_cache_tokens=8192, num_threads=1)


def run(llm: LLM, request_id: str, params: SamplingParams, resume=None):
    """Drive the engine to the end: per completion index, (tokens, text, finish_reason)."""
    engine = llm.engine
    engine.add_request(request_id, PROMPT, params, resume=resume)
    out: dict[int, list] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            entry = out.setdefault(delta.index, [[], "", None])
            entry[0] += delta.new_token_ids
            entry[1] += delta.new_text
            entry[2] = delta.finish_reason or entry[2]
    engine.check_idle_integrity()
    return {i: tuple(v) for i, v in out.items()}


def emitted_text(llm: LLM, params: SamplingParams, tokens: list[int]) -> tuple[str, str]:
    """(text an unbroken stream has emitted after `tokens`, text it holds back for a stop string)."""
    detokenizer = IncrementalDetokenizer(llm.tokenizer, params.skip_special_tokens, PROMPT)
    checker = StopStringChecker(params.stop, params.include_stop_str_in_output)
    text = "".join(checker.feed(detokenizer.add(t))[0] for t in tokens)
    return text, checker.pending


def check_resumes(llm: LLM, name: str, params: SamplingParams, cuts=(1, 7, 19)) -> None:
    tokens, text, finish = run(llm, f"{name}-unbroken", params)[0]
    assert len(tokens) > max(cuts), (name, len(tokens))
    for k in cuts:
        resumed = run(llm, f"{name}-at-{k}", params, resume=[ResumedCompletion(0, tuple(tokens[:k]))])
        got_tokens, got_text, got_finish = resumed[0]
        sent_text, _ = emitted_text(llm, params, tokens[:k])
        assert tokens[:k] + got_tokens == tokens, (name, k)
        assert sent_text + got_text == text, (name, k)
        assert got_finish == finish, (name, k)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_resume_equals_unbroken_run(llm, name):
    check_resumes(llm, name, KINDS[name])


def test_grammar_continues_mid_document(llm):
    """The JSON resumed mid-document is one valid document (not a second one from the root)."""
    params = KINDS["json_schema_seeded"]
    tokens, _, _ = run(llm, "json-probe", params)[0]
    text = llm.tokenizer.decode(tokens)
    resumed = run(llm, "json-mid", params, resume=[ResumedCompletion(0, tuple(tokens[:10]))])[0]
    whole = llm.tokenizer.decode(tokens[:10] + list(resumed[0]))
    assert whole == text
    if resumed[2] == "stop":
        document = json.loads(whole)
        assert set(document) == {"name", "age", "tags"}


def test_held_back_stop_text_is_emitted_after_resume(llm):
    """A stop string that never matches, whose prefix appears in the text: at the cut the checker
    holds that prefix back; the resumed run emits it exactly where the unbroken one does."""
    base = SamplingParams(max_tokens=40, temperature=0.8, seed=21, ignore_eos=True)
    tokens, text, _ = run(llm, "stop-probe", base)[0]
    start = len(text) // 3
    stop = text[start:start + 12] + "\x00never"
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=21, ignore_eos=True, stop=(stop,))
    cuts = [k for k in range(1, len(tokens)) if emitted_text(llm, params, tokens[:k])[1]]
    assert cuts, "no cut point holds text back"
    check_resumes(llm, "held-stop", params, cuts=tuple(cuts[:3]))


def test_stop_string_spanning_the_cut_still_stops(llm):
    base = SamplingParams(max_tokens=40, temperature=0.8, seed=22, ignore_eos=True)
    _, text, _ = run(llm, "stop2-probe", base)[0]
    stop = text[len(text) // 2:len(text) // 2 + 6]
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=22, ignore_eos=True, stop=(stop,))
    tokens, cut_text, finish = run(llm, "stop2-unbroken", params)[0]
    assert finish == "stop" and stop not in cut_text
    for k in range(1, len(tokens)):
        got = run(llm, f"stop2-{k}", params, resume=[ResumedCompletion(0, tuple(tokens[:k]))])[0]
        assert tokens[:k] + got[0] == tokens and emitted_text(llm, params, tokens[:k])[0] + got[1] == cut_text
        assert got[2] == "stop"


def test_n2_resumes_each_completion_and_skips_a_finished_one(llm):
    params = SamplingParams(n=2, max_tokens=30, temperature=0.9, seed=2**64 - 1, presence_penalty=1.0,
                            ignore_eos=True)
    unbroken = run(llm, "n2-unbroken", params)
    assert unbroken[0][0] != unbroken[1][0]
    resumed = run(llm, "n2-resumed", params, resume=[ResumedCompletion(0, tuple(unbroken[0][0][:5])),
                                                     ResumedCompletion(1, tuple(unbroken[1][0][:12]))])
    assert unbroken[0][0][:5] + resumed[0][0] == unbroken[0][0]
    assert unbroken[1][0][:12] + resumed[1][0] == unbroken[1][0]
    one_left = run(llm, "n2-one-left", params, resume=[ResumedCompletion(0, tuple(unbroken[0][0]), finished=True),
                                                       ResumedCompletion(1, tuple(unbroken[1][0][:9]))])
    assert set(one_left) == {1}
    assert unbroken[1][0][:9] + one_left[1][0] == unbroken[1][0]


def test_bad_resume_is_refused(llm):
    params = KINDS["json_schema_greedy"]
    with pytest.raises(ValueError, match="structured-output"):
        llm.engine.add_request("bad-grammar", PROMPT, params, resume=[ResumedCompletion(0, (2, 2, 2))])
    with pytest.raises(ValueError, match="outside"):
        llm.engine.add_request("bad-index", PROMPT, params, resume=[ResumedCompletion(3, (5,))])
    with pytest.raises(ValueError, match="vocabulary"):
        llm.engine.add_request("bad-token", PROMPT, params, resume=[ResumedCompletion(0, (10**6,))])
    assert not llm.engine.has_unfinished()

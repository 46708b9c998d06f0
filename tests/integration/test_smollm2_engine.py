"""The engine on the real embedded model (SmolLM2-135M-Instruct): equal to transformers on
chat prompts, and every request-level feature: seeds, n, stop strings, logprobs, abort,
structured output that validates, and a bad schema failing only its own request."""
import json
import re

import jsonschema
import pytest

from baton.services.engine import LLM, SamplingParams, StructuredOutputParams
from tests.helpers.tiny_models import hf_greedy, load_hf

CHATS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
         "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def llm(default_model_path):
    llm = LLM(model=str(default_model_path), page_size=16, kv_cache_tokens=8192, num_threads=2)
    yield llm
    llm.engine.check_idle_integrity()


def chat_ids(llm, text):
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def chat_prompts(llm):
    return [chat_ids(llm, text) for text in CHATS]


def test_chat_greedy_equals_transformers(llm, chat_prompts, default_model_path):
    outputs = llm.generate(chat_prompts, SamplingParams(temperature=0.0, max_tokens=32))
    hf = load_hf(default_model_path)
    for prompt, out in zip(chat_prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
    assert "Paris" in outputs[0].outputs[0].text


def test_seeded_sampling_reproduces_and_seeds_differ(llm, chat_prompts):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    a = llm.generate(chat_prompts[:2], params)
    b = llm.generate(chat_prompts[1:2] + chat_prompts[:1], params)  # other batch order
    assert a[0].outputs[0].token_ids == b[1].outputs[0].token_ids
    assert a[1].outputs[0].token_ids == b[0].outputs[0].token_ids
    c = llm.generate(chat_prompts[:1], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=99,
                                                      ignore_eos=True))
    assert c[0].outputs[0].token_ids != a[0].outputs[0].token_ids


def test_n_completions_are_distinct_and_reproducible(llm, chat_prompts):
    params = SamplingParams(n=3, temperature=1.2, max_tokens=16, seed=7, ignore_eos=True)
    first = llm.generate(chat_prompts[2], params)[0]
    second = llm.generate(chat_prompts[2], params)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 16 and o.finish_reason == "length" for o in first.outputs)
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]


def test_stop_string_cuts_text_exactly(llm, chat_prompts):
    base = llm.generate(chat_prompts[2], SamplingParams(temperature=0.0, max_tokens=40))[0].outputs[0].text
    stop = base[10:14]
    assert stop.strip(), "the reference text is too short for this test"
    cut = llm.generate(chat_prompts[2], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))[0].outputs[0]
    assert cut.text == base[:base.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(chat_prompts[2], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop],
                                                        include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == base[:base.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm, chat_prompts):
    base = llm.generate(chat_prompts[0], SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0]
    stop_id = base.token_ids[3]
    out = llm.generate(chat_prompts[0], SamplingParams(temperature=0.0, max_tokens=20,
                                                       stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    short = llm.generate(chat_prompts[0], SamplingParams(temperature=0.0, max_tokens=2))[0].outputs[0]
    assert short.token_ids == base.token_ids[:2] and short.finish_reason == "length"


def test_logprobs_of_greedy_tokens_are_the_top_ones(llm, chat_prompts):
    out = llm.generate(chat_prompts[1], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0][0] == token
        assert entry["logprob"] == pytest.approx(top[0][1]) and entry["logprob"] <= 0
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_abort_returns_every_block(llm, chat_prompts):
    engine = llm.engine
    engine.add_request("to-abort", chat_prompts[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("to-finish", chat_prompts[1], SamplingParams(temperature=0.0, max_tokens=3))
    for _ in range(2):
        engine.step()
    deltas = engine.abort("to-abort")
    assert [d.finish_reason for d in deltas] == ["abort"]
    while engine.has_unfinished():
        engine.step()
    engine.check_idle_integrity()
    with pytest.raises(ValueError):
        engine.add_request("bad", [10**7], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("empty", [], SamplingParams())


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                               "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["name", "population"], "additionalProperties": False}},
     "required": ["city"], "additionalProperties": False},
]
REGEXES = [r"\d{3}-\d{3}-\d{4}", r"(yes|no), because [a-z ]{5,30}\.", r"[A-Z][a-z]+ is \d{1,3} years old"]


def test_structured_outputs_validate(llm, chat_prompts):
    prompt = chat_prompts[0]
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=120,
                             structured_output=StructuredOutputParams(json=json.dumps(s)))
              for i, s in enumerate(SCHEMAS)]
    params += [SamplingParams(temperature=0.7, seed=i, max_tokens=60,
                              structured_output=StructuredOutputParams(regex=r)) for i, r in enumerate(REGEXES)]
    params.append(SamplingParams(temperature=0.0, max_tokens=200, structured_output=StructuredOutputParams(
        json_object=True)))
    prompts = [prompt] * (len(params) - 1) + [chat_ids(llm, "Describe a cat as a JSON object with keys name and color.")]
    outputs = llm.generate(prompts, params)
    for schema, out in zip(SCHEMAS, outputs):
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    for regex, out in zip(REGEXES, outputs[len(SCHEMAS):]):
        assert re.fullmatch(regex, out.outputs[0].text), out.outputs[0].text
    assert outputs[-1].outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(outputs[-1].outputs[0].text), dict)


def test_invalid_schema_fails_only_its_own_request(llm, chat_prompts):
    good = SamplingParams(temperature=0.0, max_tokens=8)
    bad = SamplingParams(structured_output=StructuredOutputParams(json='{"type": "nosuchtype"}'))
    bad_regex = SamplingParams(structured_output=StructuredOutputParams(regex="(["))
    outputs = llm.generate([chat_prompts[0]] * 3, [good, bad, bad_regex])
    assert outputs[0].error is None and len(outputs[0].outputs[0].token_ids) > 0
    assert outputs[1].error and "schema" in outputs[1].error.lower() and not outputs[1].outputs
    assert outputs[2].error and "regex" in outputs[2].error.lower()

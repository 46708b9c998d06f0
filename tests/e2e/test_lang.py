"""The frontend language against a real `baton up` (embedded SmolLM2): constrained `gen`
always matches, `select` agrees with transformers on the same weights, forked branches reuse
the shared prefix (cached-token counters of the server asserted), `run_batch` equals running
each program alone, and a failing step raises an error that names it."""
import json
import re
import time

import httpx
import jsonschema
import pytest
import torch

import baton

NAME_AGE = r'\{"name": "[A-Z][a-z]{1,12}", "age": [1-9][0-9]?\}'
PEOPLE = ["Alice is a 31 year old engineer from Paris.", "Bob, aged 45, sells fish.",
          "My grandmother Rose turned 90 last week.", "Carlos (27) plays the guitar."]


@pytest.fixture(scope="module")
def backend(baton_up):
    endpoint = baton.RuntimeEndpoint(baton_up)
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def hf(default_model_path):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    return tokenizer, model


@baton.function
def extract(s, text, **constraint):
    s += baton.system("You extract facts from text as JSON.")
    s += baton.user("Extract the person's name and age from: " + text)
    s += baton.gen("json_output", max_tokens=64, **constraint)


def test_regex_and_schema_outputs_always_match(backend):
    batch = [{"text": t, "regex": NAME_AGE} for t in PEOPLE] * 2
    states = extract.run_batch(batch, backend=backend, temperature=1.0, seed=None)
    for state in states:
        assert re.fullmatch(NAME_AGE, state["json_output"]), state["json_output"]
        assert state.get_meta_info("json_output")["finish_reason"] == "stop"
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    states = extract.run_batch([{"text": t, "json_schema": schema} for t in PEOPLE] * 2, backend=backend,
                               temperature=0.8)
    for state in states:
        jsonschema.validate(json.loads(state["json_output"]), schema)


def _reference_score(hf, messages, reply_prefix, choice) -> tuple[float, float]:
    """(score of `choice` after the assistant reply begun with `reply_prefix`, transformers)."""
    tokenizer, model = hf
    def render(text):
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": text}],
                                             continue_final_message=True, tokenize=False)
    prefix, full = tokenizer.encode(render(reply_prefix)), tokenizer.encode(render(reply_prefix + choice))
    shared = next(i for i in range(len(prefix) + 1) if i == len(prefix) or prefix[i] != full[i])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    values = [logprobs[i - 1, full[i]].item() for i in range(shared, len(full))]
    return sum(values) / len(values), shared


@baton.function
def classify(s, review):
    s += baton.user("Review: " + review + "\nIs this review positive, negative or neutral?")
    s += baton.assistant("The review is " + baton.select("label", choices=["positive", "negative", "neutral"]))


@pytest.mark.parametrize("review", ["The food was cold and the waiter was rude.", "Wonderful evening, lovely staff!"])
def test_select_agrees_with_a_direct_logprob_computation(backend, hf, review):
    state = classify.run(review=review, backend=backend)
    messages = [{"role": "user", "content": "Review: " + review + "\nIs this review positive, negative or neutral?"}]
    choices = ["positive", "negative", "neutral"]
    reference = [_reference_score(hf, messages, "The review is ", c)[0] for c in choices]
    assert state.get_meta_info("label")["scores"] == pytest.approx(reference, abs=1e-3)
    assert state["label"] == choices[max(range(3), key=reference.__getitem__)]
    assert state.messages()[-1] == {"role": "assistant", "content": "The review is " + state["label"]}


def _matched(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("baton_router_worker_prefix_tokens_matched_total"))


FORKS = []


@baton.function
def branches(s, topic):
    s += baton.system("You are a helpful assistant who writes short notes. " * 6)
    s += baton.user("Write notes about " + topic + ".")
    forks = s.fork(4)
    for i, fork in enumerate(forks):
        fork += baton.assistant("Note " + str(i + 1) + ":" + baton.gen("note", max_tokens=6))
    forks.join()
    FORKS.append(forks)
    s += baton.assistant("Summary:" + baton.gen("summary", max_tokens=6))


def test_forks_reuse_the_shared_prefix(backend, baton_up):
    before = _matched(baton_up)
    state = branches.run(topic="volcanoes", backend=backend, temperature=0)
    forks = FORKS.pop()
    prefix = len(httpx.post(baton_up + "/tokenize", json={"messages": forks[0].messages()[:2]}, timeout=30)
                 .json()["tokens"])
    cached = [f.get_meta_info("note")["cached_tokens"] for f in forks]
    assert all(c >= prefix // 16 * 16 - 16 and c > 0 for c in cached), (prefix, cached)
    assert len({f["note"] for f in forks}) > 1  # the branches did diverge
    deadline = time.monotonic() + 10  # the router re-exports the counters of its last health check (~1 s old)
    while _matched(baton_up) - before < sum(cached) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _matched(baton_up) - before >= sum(cached)  # the workers' own counters saw the hits
    assert state.get_meta_info("summary")["cached_tokens"] > 0


@baton.function
def qa(s, question):
    s += "Q: " + question + "\nA:"
    s += baton.gen("answer", max_tokens=8, stop="\n")
    s += "\nIs that answer correct? Reply yes or no:" + baton.select("check", choices=[" yes", " no"])


def test_run_batch_equals_running_each_alone(backend):
    questions = [{"question": q} for q in ("What is 2 + 2?", "Name a color.", "What is the capital of Italy?",
                                           "How many legs has a cat?", "What is water made of?", "Who wrote Hamlet?")]
    batch = qa.run_batch(questions, backend=backend, temperature=0, num_threads=6)
    alone = [qa.run(**q, backend=backend, temperature=0) for q in questions]
    assert [s.variables() for s in batch] == [s.variables() for s in alone]
    assert [s.text() for s in batch] == [s.text() for s in alone]
    assert batch[2].text().startswith("Q: What is the capital of Italy?\nA:")


@baton.function
def failing(s):
    s += "Count: one, two,"
    s += baton.gen("first", max_tokens=4, temperature=0)
    s += baton.gen("second", max_tokens=4, regex="(unclosed")
    s += baton.gen("third", max_tokens=4)


def test_a_server_error_names_the_failed_step(backend):
    with pytest.raises(baton.ProgramError, match=r"failing: step 3 gen\('second'\) failed: .*HTTP 400.*regex"):
        failing.run(backend=backend)
    [ok, bad] = qa.run_batch([{"question": "Name a fruit."}, {"question": "word " * 9000}], backend=backend,
                             temperature=0)
    assert ok.error() is None and ok["answer"]
    assert isinstance(bad.error(), baton.ProgramError) and "qa[1]: step 2 gen('answer')" in str(bad.error())
    with pytest.raises(baton.ProgramError, match="maximum context length"):
        bad["answer"]
    assert bad.error().cause.status == 400


@baton.function
def misuse(s):
    s += baton.user("Hello")
    s += "stray text"


@baton.function
def with_image(s):
    with s.user():
        s += "What is in this picture?"
        s += baton.image(b"\x89PNG\r\n\x1a\n" + bytes(16))
    s += baton.gen("caption", max_tokens=8)


def test_misuse_and_unsupported_inputs_fail_clearly(backend, baton_up):
    with pytest.raises(baton.ProgramError, match=r"step 2 text 'stray text' failed: UsageError: text outside a role"):
        misuse.run(backend=backend)
    with pytest.raises(baton.ProgramError, match=r"step 5 gen\('caption'\).*takes no image inputs"):
        with_image.run(backend=backend)
    with pytest.raises(ValueError, match="at most one of regex and json_schema"):
        baton.gen("x", regex="a", json_schema={})
    with pytest.raises(baton.BackendError, match="cannot reach the Baton gateway"):
        baton.RuntimeEndpoint(baton_up.rsplit(":", 1)[0] + ":1", timeout_s=5)

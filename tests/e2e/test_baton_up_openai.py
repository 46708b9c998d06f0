"""The official `openai` client against a real `baton up` (embedded SmolLM2, one prefill
and one decode worker over tcp): chat and completions, streaming and not, n > 1, stop,
json_schema output that validates, usage numbers, cached tokens on a repeated prefix,
greedy outputs equal to the offline engine's, and OpenAI-shaped errors."""
import json
import re
import urllib.request

import jsonschema
import openai
import pytest



@pytest.fixture(scope="module")
def client(baton_up):
    return openai.OpenAI(base_url=baton_up + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def chat(client, model, text, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          **kwargs)


def test_chat_non_streaming_with_usage(client, model_name):
    reply = chat(client, model_name, "What is the capital of France?", max_tokens=16, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client, model_name):
    kwargs = dict(max_tokens=24, temperature=0)
    whole = chat(client, model_name, "Name three primary colors.", **kwargs).choices[0].message.content
    chunks = list(chat(client, model_name, "Name three primary colors.", stream=True,
                       stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_greedy_through_the_gateway_equals_the_offline_engine(client, model_name, default_model_path):
    from baton.services.engine import LLM, SamplingParams
    prompt = "Once upon a time, in a small village,"
    reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=20, temperature=0)
    llm = LLM(model=str(default_model_path), num_threads=1, kv_cache_tokens=2048)
    offline = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0].text
    assert reply.choices[0].text == offline


def test_completions_n_and_stop(client, model_name):
    reply = client.completions.create(model=model_name, prompt="List some fruits: apple,", max_tokens=12,
                                      temperature=1.0, n=3, seed=4)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert 3 <= reply.usage.completion_tokens <= 36  # summed over the three completions
    assert len({c.text for c in reply.choices}) > 1
    base = client.completions.create(model=model_name, prompt="Count: one, two, three,", max_tokens=20,
                                     temperature=0).choices[0].text
    stop = base.strip().split()[1] if len(base.split()) > 1 else base[:2]
    cut = client.completions.create(model=model_name, prompt="Count: one, two, three,", max_tokens=20,
                                    temperature=0, stop=[stop]).choices[0]
    assert cut.text == base[:base.index(stop)] and cut.finish_reason == "stop"


def test_json_schema_output_validates(client, model_name):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = chat(client, model_name, "Describe a person as JSON.", max_tokens=60, temperature=0.7, seed=1,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    regex = client.completions.create(model=model_name, prompt="A phone number:", max_tokens=20,
                                      extra_body={"regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", regex.choices[0].text)


def test_cached_tokens_reported_on_a_repeated_prefix(client, model_name):
    system = "You are a helpful assistant who answers briefly. " * 8
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hi."}]
    client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, temperature=0)
    again = client.chat.completions.create(model=model_name, messages=messages, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 64


def test_openai_errors(client, model_name, baton_up):
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-model", "hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        chat(client, model_name, "hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError) as excinfo:
        chat(client, model_name, "hi", max_tokens=10**6)
    assert "context" in str(excinfo.value).lower()
    with urllib.request.urlopen(baton_up + "/workers", timeout=5) as reply:
        workers = json.loads(reply.read())
    assert {w["role"] for w in workers} == {"prefill", "decode"} and all(w["healthy"] for w in workers)

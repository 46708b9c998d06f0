"""Tool calling through the gateway with the official `openai` client, on the router that has
the SmolLM2 Hermes tool template (`tool_router`, in front of the session's `baton up` workers):
a weather-tool round trip (call, tool result, final answer), `required` and named choices whose
arguments always validate against the function's schema, the Hermes parser reading `<tool_call>`
output (forced with a regex: the 135M model's own choices are not what is under test), and
streamed `delta.tool_calls` that concatenate to the non-streamed message."""
import json
import urllib.request

import jsonschema
import openai
import pytest

CITY = {"type": "string", "enum": ["Paris", "London", "Tokyo"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": CITY, "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time of a city",
    "parameters": {"type": "object", "properties": {"city": CITY}, "required": ["city"],
                   "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(tool_router):
    return openai.OpenAI(base_url=tool_router + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def check_calls(message, at_least=1):
    assert len(message.tool_calls or []) >= at_least
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_weather_round_trip(client, model, tool_router):
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                           max_tokens=40, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    check_calls(choice.message)
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    final = client.chat.completions.create(model=model, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                           max_tokens=24, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    # the call and its result reached the template: the rendered prompt holds both
    body = json.dumps({"messages": history}).encode()
    with urllib.request.urlopen(urllib.request.Request(tool_router + "/tokenize", data=body)) as answer:
        tokens = json.loads(answer.read())["tokens"]
    with urllib.request.urlopen(urllib.request.Request(
            tool_router + "/detokenize", data=json.dumps({"tokens": tokens}).encode())) as answer:
        prompt = json.loads(answer.read())["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {' in prompt, prompt
    assert '<tool_response>\n{"temperature": 21, "sky": "sunny"}\n</tool_response>' in prompt


def test_required_and_named_arguments_always_validate(client, model):
    sampled = dict(model=model, messages=ASK, tools=[WEATHER, TIME], temperature=1.0, max_tokens=50)
    single = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, seed=5, n=3, **sampled)
    for choice in single.choices:  # sampled freely, constrained to one call of one of the tools
        assert len(choice.message.tool_calls) == 1 and choice.finish_reason == "tool_calls"
        check_calls(choice.message)
    named = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           seed=9, n=2, **sampled)
    for choice in named.choices:
        check_calls(choice.message)
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]


def joined_stream(client, **kwargs):
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or call.id
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def whole(message):
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


@pytest.mark.parametrize("choice", ["auto_hermes", "required", "named"])
def test_streamed_tool_calls_concatenate_to_the_non_streamed_message(client, model, choice):
    kwargs = dict(model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0)
    if choice == "auto_hermes":  # the model writes a Hermes call: the parser (not the grammar) reads it
        kwargs["extra_body"] = {"regex": r'Checking\.\n<tool_call>\n\{"name": "get_time", "arguments": '
                                         r'\{"city": "(Paris|Tokyo)"\}\}\n</tool_call>'}
    elif choice == "required":  # one call: greedy decoding would otherwise list calls up to max_tokens
        kwargs.update(tool_choice="required", parallel_tool_calls=False)
    else:
        kwargs["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = joined_stream(client, **kwargs)
    assert whole(reply.message) and [{"name": c["name"], "arguments": c["arguments"]} for c in calls] == whole(
        reply.message)
    assert all(c["id"] and c["id"].startswith("call_") for c in calls)
    assert content == (reply.message.content or "") and finish == reply.finish_reason == "tool_calls"
    check_calls(reply.message)
    if choice == "auto_hermes":
        assert reply.message.content == "Checking.\n"


def test_tool_refusals(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=ASK, tools=[{"type": "web_search"}], max_tokens=4)
    assert "only function tools" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "not among the tools" in info.value.message

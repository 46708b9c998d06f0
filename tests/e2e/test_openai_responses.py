"""The Responses API (`/v1/responses`) with the official client's `client.responses.create`, on
the tool router (`tool_router`): text and message-list input with instructions, the streamed
event sequence whose deltas make the non-streamed text, structured output through
`text.format`, a function-tool round trip, and the clear 400s of a stateless server."""
import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(tool_router):
    return openai.OpenAI(base_url=tool_router + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_text_and_message_input(client):
    reply = client.responses.create(input="What is the capital of France?", instructions="Answer in one word.",
                                    max_output_tokens=12, temperature=0)
    assert reply.object == "response" and reply.status in ("completed", "incomplete") and reply.store is False
    assert reply.output_text and reply.output[0].type == "message" and reply.output[0].role == "assistant"
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    items = client.responses.create(input=[
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Now say goodbye."}]}],
        max_output_tokens=2, temperature=0)
    assert items.status == "incomplete" and items.incomplete_details.reason == "max_output_tokens"
    assert items.usage.output_tokens == 2 and items.usage.input_tokens > reply.usage.input_tokens - 12


def test_streamed_events_make_the_non_streamed_text(client):
    kwargs = dict(input="Name three primary colors.", max_output_tokens=20, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_structured_output_with_text_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
              "required": ["city", "population"], "additionalProperties": False}
    # bounded fields: a sampled small model may otherwise write digits until max_output_tokens cuts the JSON
    reply = client.responses.create(input="Give a city as JSON.", max_output_tokens=120, temperature=0.8,
                                    text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert reply.status == "completed", reply.status
    jsonschema.validate(json.loads(reply.output_text), schema)


def test_function_tool_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    call = client.responses.create(input=ask, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                                   max_output_tokens=30, temperature=0)
    calls = [item for item in call.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    streamed = list(client.responses.create(input=ask, tools=[WEATHER], stream=True, max_output_tokens=30,
                                            temperature=0, tool_choice={"type": "function", "name": "get_weather"}))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == calls[0].arguments == "".join(
        e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    answer = client.responses.create(
        input=ask + [{"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                      "arguments": calls[0].arguments},
                     {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "clear"}'}],
        tools=[WEATHER], tool_choice="none", max_output_tokens=16, temperature=0)
    assert answer.output_text and not [i for i in answer.output if i.type == "function_call"]


@pytest.mark.parametrize("kwargs, words", [
    (dict(previous_response_id="resp_123"), "previous_response_id is not supported"),
    (dict(store=True), "store: true is not supported"),
    (dict(tools=[{"type": "web_search"}]), "only function tools"),
])
def test_stateless_refusals(client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input="hi", max_output_tokens=4, **kwargs)
    assert words in info.value.message
    with pytest.raises(openai.APIStatusError) as info:
        client.responses.retrieve("resp_123")
    assert info.value.status_code == 501 and "stored responses are not supported" in info.value.message

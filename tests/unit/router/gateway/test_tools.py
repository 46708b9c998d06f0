"""Tool calling's request and response sides (router/gateway/tools.py) without a model: the
plan of each tool_choice and its 400s, the `required` schema (checked with jsonschema), the
template's view of the history, and streamed deltas (content held back while a call may begin,
calls as `delta.tool_calls`) that concatenate to the non-streamed message for every parser,
every split of the text into chunks."""
import json
import random

import jsonschema
import pytest

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.errors import ApiError
from baton.router.gateway.responses import ResponseContext
from baton.router.gateway.tool_parsers import PARSERS
from baton.router.gateway.tools import ToolChatStream, plan_tools, required_schema, tool_messages
from baton.router.types import Chunk

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"$ref": "#/$defs/tz"}}, "$defs": {"tz": {"enum": ["UTC", "CET"]}}}}}


def error(fn) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn()
    assert info.value.status == 400
    return info.value


def test_plans_and_refusals():
    hermes = PARSERS["hermes"]
    assert plan_tools(None, None, None, None).mode == "none"
    assert plan_tools([WEATHER], None, None, hermes).mode == "auto"
    assert plan_tools([WEATHER], "none", None, None).template_tools() is None  # no tools in the prompt
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None, None)
    assert named.mode == "named" and named.named == "get_time"
    assert error(lambda: plan_tools([WEATHER], "auto", None, None)).param == "tool_choice"
    assert "not among the tools" in error(lambda: plan_tools(
        [WEATHER], {"type": "function", "function": {"name": "nope"}}, None, None)).message
    assert error(lambda: plan_tools(None, "required", None, None)).param == "tool_choice"
    assert error(lambda: plan_tools([WEATHER], "sometimes", None, hermes)).param == "tool_choice"
    assert error(lambda: plan_tools([{"type": "code_interpreter"}], None, None, hermes)).param == "tools.0"
    assert error(lambda: plan_tools([WEATHER, WEATHER], None, None, hermes)).param == "tools"


def test_constraints():
    params = common_pb2.SamplingParams()
    plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, None).constrain(params)
    assert json.loads(params.structured_output.json_schema) == WEATHER["function"]["parameters"]
    params = common_pb2.SamplingParams(structured_output=common_pb2.StructuredOutput(regex="a+"))
    assert "cannot be combined" in error(lambda: plan_tools([WEATHER], "required", None, None).constrain(params)).message
    params = common_pb2.SamplingParams()
    plan_tools([WEATHER], "auto", None, PARSERS["mistral"]).constrain(params)
    assert params.keep_special_tokens and not params.HasField("structured_output")


def test_required_schema():
    tools = plan_tools([WEATHER, TIME], "required", None, None).tools
    schema = required_schema(tools, parallel=True)
    good = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {"tz": "UTC"}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "get_time", "parameters": {"tz": "PST"}}],
                [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, required_schema(tools, parallel=False))


def test_history_arguments_become_objects():
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    assert tool_messages(history)[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}


OUTPUTS = {
    "hermes": ['Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
               'plain answer with <tool_ but no call', '<tool_call>{"broken</tool_call>'],
    "llama3_json": ['  {"name": "get_weather", "parameters": {"city": "Lima"}}', "It is sunny {not a call}",
                    "<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}"],
    "mistral": ['ok [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Kyiv"}}]', "no calls [TOOL"],
}


def stream_message(plan, text: str, rng: random.Random) -> dict:
    """Feed `text` in random pieces through a ToolChatStream; the deltas joined as a message."""
    stream = ToolChatStream(ResponseContext(request_id="x", model="m", prompt_tokens=3, strings=None), plan)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    content, calls, finish = "", {}, None
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        obj = stream.chunk(Chunk(index=0, token_ids=[1], text=piece, finish_reason="stop" if last else None))
        if obj is None:
            continue
        choice = obj["choices"][0]
        content += choice["delta"].get("content") or ""
        for call in choice["delta"].get("tool_calls") or []:
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call.get("function", {}).get("name") or ""
            entry["arguments"] += call.get("function", {}).get("arguments") or ""
        finish = choice["finish_reason"] or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def whole_message(plan, text: str) -> dict:
    completion = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
    choice = plan.finish_completion(completion)["choices"][0]
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in choice["message"].get("tool_calls") or []]
    return {"content": choice["message"]["content"] or "", "calls": calls, "finish": choice["finish_reason"]}


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
def test_streamed_deltas_concatenate_to_the_whole_message(parser):
    rng = random.Random(7)
    plan = plan_tools([WEATHER, TIME], "auto", None, PARSERS[parser])
    for text in OUTPUTS[parser]:
        whole = whole_message(plan, text)
        for _ in range(20):
            assert stream_message(plan, text, rng) == whole, text
    assert whole_message(plan, OUTPUTS[parser][0])["calls"] and whole_message(plan, OUTPUTS[parser][0])[
        "finish"] == "tool_calls"


def test_streamed_named_and_required():
    rng = random.Random(3)
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, None)
    required = plan_tools([WEATHER, TIME], "required", None, None)
    cases = [(named, '{"city": "Bern"}'),
             (required, '[{"name": "get_time", "parameters": {"tz": "UTC"}}, '
                        '{"name": "get_weather", "parameters": {"city": "Bern"}}]')]
    for plan, text in cases:
        whole = whole_message(plan, text)
        assert whole["content"] == "" and whole["calls"] and whole["finish"] == "tool_calls"
        for _ in range(10):
            assert stream_message(plan, text, rng) == whole

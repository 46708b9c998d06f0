"""The Responses API's request side without a model (router/gateway/responses_api.py): input
strings and items (messages, parts, function calls merged into one assistant turn, their
outputs as tool messages), instructions first, `text.format` and flat function tools mapped to
their chat fields, and the 400s of a stateless server; and the response object built from a
chat completion."""
import pytest

from baton.router.gateway.errors import ApiError
from baton.router.gateway.responses_api import ResponseShell, ResponsesRequest, response_from_completion, to_chat
from baton.router.gateway.tools import plan_tools


def chat_of(**body):
    return to_chat(ResponsesRequest.model_validate(body))


def test_input_items_become_chat_messages():
    chat = chat_of(instructions="Be brief.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "one"},
        {"type": "function_call_output", "call_id": "call_2", "output": "two"}])
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "a\nb"}
    assert [c["function"]["name"] for c in messages[2]["tool_calls"]] == ["f", "g"]  # one assistant turn
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "one"}
    assert chat_of(input="hi").messages[0].content == "hi"


def test_fields_map_to_chat():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_of(input="x", max_output_tokens=7, temperature=0.5,
                   text={"format": {"type": "json_schema", "name": "n", "schema": schema}},
                   tools=[{"type": "function", "name": "f", "parameters": schema}],
                   tool_choice={"type": "function", "name": "f"})
    assert chat.requested_max_tokens == 7 and chat.temperature == 0.5
    assert chat.response_format.json_schema.schema_ == schema
    plan = plan_tools(chat.tools, chat.tool_choice, chat.parallel_tool_calls, None)
    assert plan.mode == "named" and plan.named == "f"


@pytest.mark.parametrize("body, param", [
    (dict(input="x", previous_response_id="resp_1"), "previous_response_id"),
    (dict(input="x", store=True), "store"),
    (dict(input="x", background=True), "background"),
    (dict(input="x", conversation="conv_1"), "conversation"),
    (dict(input=[{"type": "reasoning", "summary": []}]), "input.0"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input.0.content.0"),
    (dict(input="x", tools=[{"type": "file_search"}]), "tools.0"),
    (dict(input="x", text={"format": {"type": "json_schema"}}), "text.format.schema"),
    (dict(input=[]), "input"),
])
def test_refusals_name_the_field(body, param):
    with pytest.raises(ApiError) as info:
        chat_of(**body)
    assert info.value.status == 400 and info.value.param == param


def test_response_object_from_a_completion():
    body = ResponsesRequest.model_validate({"input": "x", "max_output_tokens": 5})
    completion = {"choices": [{"message": {"role": "assistant", "content": "Hi", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                                               "prompt_tokens_details": {"cached_tokens": 1}}}
    obj = response_from_completion(ResponseShell(body, "m", None), completion)
    assert obj["status"] == "incomplete" and obj["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [i["type"] for i in obj["output"]] == ["message", "function_call"]
    assert obj["output"][1]["call_id"] == "call_9" and obj["store"] is False
    assert obj["usage"] == {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 5,
                            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 8}

"""Tool-call parsers on text (router/gateway/tool_parsers.py): Hermes / Qwen `<tool_call>`,
Llama 3 JSON and Mistral `[TOOL_CALLS]` outputs read into content + calls, text that holds no
valid call kept whole as content, and the parser a chat template implies."""
import json
from pathlib import Path

import pytest

from baton.router.gateway.tool_parsers import (detect_parser, get_parser, parse_hermes, parse_llama3_json,
                                               parse_mistral, resolve_parser)

TEMPLATE = Path(__file__).parents[4] / "router" / "gateway" / "templates" / "smollm2_tool_hermes.jinja"


def calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_hermes():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>')
    parsed = parse_hermes(text)
    assert parsed.content == "Let me check.\n"
    assert calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    unclosed = parse_hermes('<tool_call>\n{"name": "f", "arguments": {}}\n')  # stopped before the close tag
    assert unclosed.content is None and calls(unclosed) == [("f", {})]
    quoted = parse_hermes('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert calls(quoted) == [("f", {"a": 1})]
    for text in ("Just an answer.", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>'):
        parsed = parse_hermes(text)
        assert parsed.calls == [] and parsed.content == text


def test_llama3_json():
    assert calls(parse_llama3_json('{"name": "get_weather", "parameters": {"city": "Oslo"}}')) == [
        ("get_weather", {"city": "Oslo"})]
    tagged = parse_llama3_json('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}')
    assert tagged.content is None and calls(tagged) == [("a", {}), ("b", {"x": 1})]
    for text in ("The weather is fine.", '{"name": "a", "parameters": {}} trailing', '{"name": 3}', "{broken"):
        parsed = parse_llama3_json(text)
        assert parsed.calls == [] and parsed.content == text


def test_mistral():
    v3 = parse_mistral('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                       '{"name": "get_time", "arguments": {}}]')
    assert v3.content is None and calls(v3) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    v11 = parse_mistral('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{}')
    assert v11.content == "Sure. " and calls(v11) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    for text in ("No tools needed.", "[TOOL_CALLS] [{oops}]", "[TOOL_CALLS]name_only"):
        parsed = parse_mistral(text)
        assert parsed.calls == [] and parsed.content == text


def test_detection_from_templates():
    assert detect_parser(TEMPLATE.read_text()) == "hermes"
    assert detect_parser("{{ '<|start_header_id|>ipython<|end_header_id|>' }}{{ '<|python_tag|>' }}") == "llama3_json"
    assert detect_parser("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("{{ message['content'] }}") is None and detect_parser(None) is None
    assert resolve_parser("", TEMPLATE.read_text()).name == "hermes"
    assert resolve_parser("mistral", TEMPLATE.read_text()).name == "mistral"  # the flag wins
    assert resolve_parser("", "plain") is None
    assert get_parser("qwen").name == "hermes"
    with pytest.raises(ValueError, match="known: hermes, llama3_json, mistral"):
        get_parser("granite")

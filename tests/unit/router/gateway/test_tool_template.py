"""The Hermes-style tool template shipped for SmolLM2 (router/gateway/templates/): without tools
it renders exactly as the model's own template; with tools it lists them in the system turn and
renders assistant tool calls as `<tool_call>` blocks that the hermes parser reads back, and tool
results as `<tool_response>` blocks."""
import json
from pathlib import Path

from baton.router.gateway.tool_parsers import parse_hermes

TEMPLATE = (Path(__file__).parents[4] / "router" / "gateway" / "templates" / "smollm2_tool_hermes.jinja").read_text()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_without_tools_it_renders_as_the_models_own(tokenizer):
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}],
        [{"role": "developer", "content": "D"}, {"role": "user", "content": "q"}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 chat_template=TEMPLATE)
            assert ours == own


def test_with_tools_calls_and_results_round_trip(tokenizer):
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=TOOLS,
                                         chat_template=TEMPLATE)
    assert text.startswith("<|im_start|>system\nSYS\n\n# Tools") and text.count("<|im_start|>system") == 1
    assert json.dumps(TOOLS[0]) in text and "<tool_response>\ncold\n</tool_response>" in text
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert [(c.name, json.loads(c.arguments)) for c in parse_hermes(turn).calls] == [("get_weather", {"city": "Oslo"})]

"""Tool calling in `/v1/chat/completions` (and the Responses API): the request side and the
response side of `tools` / `tool_choice` / `parallel_tool_calls`.

Request: `plan_tools(body, parser)` checks the tools (function tools only) and the choice and
returns a `ToolPlan`:
- `none` (or no tools): no tool calls; the tools are left out of the prompt;
- `auto` (the default with tools): the tools go into the chat template (`tools=`), the model
  writes calls in its family's syntax and the router's parser (`--tool-call-parser`, or the one
  the template implies) reads them; without a parser this is a 400, as in vLLM;
- `required`: the output is constrained (xgrammar, through the structured-output path) to a JSON
  list of `{"name", "parameters"}` objects, one of the tools each (exactly one when
  `parallel_tool_calls` is false), so it always parses, with or without a parser;
- a named function: the output is constrained to that function's parameters schema and is its
  arguments.
`tool_messages` prepares the history for the template: assistant `tool_calls` arguments as
objects (templates serialize them), `tool` messages as they are.

Response: `ToolPlan.finish_completion` rewrites a `chat.completion` object's messages
(`content`, `tool_calls`, finish_reason `tool_calls`); `ToolChatStream` does the same to a
stream: content streams until a tool call may begin, the calls follow as `delta.tool_calls`
(the named function's arguments as they are generated, the others on the final chunk), so the
deltas concatenate to the non-streamed message.
"""
from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.errors import invalid_request
from baton.router.gateway.responses import ChatStream, ResponseContext
from baton.router.gateway.tool_parsers import ParsedOutput, ToolCall, ToolParser
from baton.router.types import Chunk


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class FunctionTool:
    name: str
    description: Optional[str]
    parameters: dict[str, Any]


def parse_tools(tools: Optional[list[dict[str, Any]]], param: str = "tools",
                flat: bool = False) -> list[FunctionTool]:
    """The function tools of a request; 400 for another type or a malformed one. `flat`: the
    Responses API's shape (`{"type": "function", "name", "parameters"}`)."""
    out = []
    for i, tool in enumerate(tools or []):
        where = f"{param}.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise invalid_request(f"tool type {kind!r} is not supported; only function tools are", param=where)
        spec = tool if flat else tool.get("function")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise invalid_request("a function tool needs a name" + ("" if flat else " (function.name)"),
                                  param=where)
        parameters = spec.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid_request("function parameters must be a JSON schema object", param=f"{where}.parameters")
        out.append(FunctionTool(spec["name"], spec.get("description"), parameters))
    names = [t.name for t in out]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise invalid_request(f"tool {duplicate!r} is given more than once", param=param)
    return out


def _hoisted(schemas: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Schemas with their `$defs` moved to one top-level `$defs` (refs stay `#/$defs/...`)."""
    defs: dict[str, Any] = {}
    out = []
    for schema in schemas:
        schema = copy.deepcopy(schema)
        defs.update(schema.pop("$defs", {}) or {})
        out.append(schema)
    return out, defs


def required_schema(tools: list[FunctionTool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of `tool_choice: required` output: a list of calls of the given tools."""
    params, defs = _hoisted([t.parameters for t in tools])
    items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.name]}, "parameters": p},
              "required": ["name", "parameters"]} for t, p in zip(tools, params)]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


@dataclass
class ToolPlan:
    """How one request's tools shape its prompt, its sampling and its response."""

    mode: str = "none"
    """none | auto | required | named."""
    tools: list[FunctionTool] = field(default_factory=list)
    named: Optional[str] = None
    parallel: bool = True
    parser: Optional[ToolParser] = None

    @property
    def active(self) -> bool:
        """True when the response may carry tool calls."""
        return self.mode != "none"

    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools as the chat template takes them (`tools=`), or None to leave them out."""
        if not self.active:
            return None
        return [{"type": "function", "function": {"name": t.name, **({"description": t.description}
                                                                    if t.description else {}),
                                                  "parameters": t.parameters}} for t in self.tools]

    def constrain(self, params: common_pb2.SamplingParams) -> None:
        """Set the sampling constraint (required / named) or keep special tokens (auto, when
        the parser's markers are special tokens); 400 when the request has its own constraint."""
        if self.mode in ("required", "named"):
            if params.HasField("structured_output"):
                raise invalid_request(f"tool_choice {self.mode!r} cannot be combined with response_format, "
                                      "regex or ebnf", param="tool_choice")
            if self.mode == "named":
                schema = next(t.parameters for t in self.tools if t.name == self.named)
            else:
                schema = required_schema(self.tools, self.parallel)
            params.structured_output.CopyFrom(common_pb2.StructuredOutput(json_schema=json.dumps(schema)))
        elif self.mode == "auto" and self.parser is not None and self.parser.special_tokens:
            params.keep_special_tokens = True

    def parse(self, text: str) -> ParsedOutput:
        """A whole completion's text as content + calls."""
        if self.mode == "named":
            return ParsedOutput(None, [ToolCall(self.named, text)])
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return ParsedOutput(text or None, [])
            calls = [ToolCall(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False))
                     for i in items if isinstance(i, dict) and isinstance(i.get("name"), str)]
            return ParsedOutput(None, calls) if calls else ParsedOutput(text or None, [])
        if self.mode == "auto" and self.parser is not None:
            return self.parser.parse(text)
        return ParsedOutput(text, [])

    def finish_completion(self, completion: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a `chat.completion` object's choices with the parsed tool calls."""
        for choice in completion["choices"]:
            parsed = self.parse(choice["message"]["content"] or "")
            choice["message"]["content"] = parsed.content
            if parsed.calls:
                choice["message"]["tool_calls"] = [
                    {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in parsed.calls]
                if choice["finish_reason"] == "stop":
                    choice["finish_reason"] = "tool_calls"
        return completion


def plan_tools(tools: Optional[list[dict[str, Any]]], tool_choice: Any, parallel_tool_calls: Optional[bool],
               parser: Optional[ToolParser], *, flat: bool = False) -> ToolPlan:
    """The plan of a request's tools and choice; 400 for anything that cannot be served."""
    parsed = parse_tools(tools, flat=flat)
    parallel = parallel_tool_calls is not False
    choice = tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise invalid_request(f"tool_choice type {choice.get('type')!r} is not supported; "
                                  "give none, auto, required or a function", param="tool_choice")
        spec = choice if flat else (choice.get("function") or {})
        name = spec.get("name")
        if not parsed:
            raise invalid_request("a named tool_choice needs tools", param="tool_choice")
        if name not in {t.name for t in parsed}:
            raise invalid_request(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return ToolPlan("named", parsed, name, parallel, parser)
    if choice is None:
        choice = "auto" if parsed else "none"
    if choice not in ("none", "auto", "required"):
        raise invalid_request(f"tool_choice {choice!r} is not supported; give none, auto, required or a function",
                              param="tool_choice")
    if choice == "required" and not parsed:
        raise invalid_request("tool_choice 'required' needs tools", param="tool_choice")
    if choice == "none" or not parsed:
        return ToolPlan("none", parsed, None, parallel, parser)
    if choice == "auto" and parser is None:
        raise invalid_request(
            '"auto" tool choice needs a tool-call parser: start the router with --tool-call-parser '
            "(hermes, llama3_json or mistral) or a --chat-template whose tool syntax names one; "
            "tool_choice 'required' or a named function works without one", param="tool_choice")
    return ToolPlan(choice, parsed, None, parallel, parser)


def tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history for the chat template: assistant tool-call arguments as objects (templates
    serialize them themselves), as vLLM hands them over."""
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except ValueError:
                    pass  # the template gets the text as it is
    return messages


# ---------------------------------------------------------------------------- streaming


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                best = max(best, k)
                break
    return best


class _ChoiceState:
    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        """Characters of `text` already sent as content."""
        self.tool_mode = False
        self.call_id: Optional[str] = None


class ToolChatStream(ChatStream):
    """`chat.completion.chunk` objects whose deltas carry content and `tool_calls` (see the module doc)."""

    def __init__(self, ctx: ResponseContext, plan: ToolPlan) -> None:
        super().__init__(ctx)
        self.plan = plan
        self._states: dict[int, _ChoiceState] = {}

    def chunk(self, chunk: Chunk) -> Optional[dict[str, Any]]:
        obj = super().chunk(chunk)
        if obj is None or not self.plan.active:
            return obj
        choice = obj["choices"][0]
        delta = choice["delta"]
        state = self._states.setdefault(chunk.index, _ChoiceState())
        state.text += delta.pop("content", "") or ""
        final = chunk.finish_reason is not None
        if self.plan.mode == "named":
            self._named(state, delta)
            if final and choice["finish_reason"] == "stop":
                choice["finish_reason"] = "tool_calls"
        elif final:
            self._finish(state, delta, choice)
        else:
            self._content(state, delta)
        if not final and not delta and not (self.ctx.logprobs or self.ctx.continuous_usage):
            return None
        return obj

    def _named(self, state: _ChoiceState, delta: dict[str, Any]) -> None:
        piece = state.text[state.sent:]
        state.sent = len(state.text)
        call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
        if state.call_id is None:
            state.call_id = new_call_id()
            call.update(id=state.call_id, type="function")
            call["function"] = {"name": self.plan.named, "arguments": piece}
        if piece or "id" in call:
            delta["tool_calls"] = [call]

    def _content(self, state: _ChoiceState, delta: dict[str, Any]) -> None:
        """Content that cannot start a tool call goes out now; the rest waits."""
        plan = self.plan
        if plan.mode == "required" or state.tool_mode:
            state.tool_mode = True
            return
        parser = plan.parser
        text = state.text
        if parser.at_start_only:
            stripped = text.lstrip()
            if not stripped:
                return
            if state.sent == 0 and any(stripped.startswith(m) or m.startswith(stripped) for m in parser.markers):
                if any(stripped.startswith(m) for m in parser.markers):
                    state.tool_mode = True
                return
            upto = len(text)
        else:
            found = [i for i in (text.find(m, state.sent) for m in parser.markers) if i >= 0]
            if found:
                state.tool_mode = True
                upto = min(found)
            else:
                upto = len(text) - _held_back(text, parser.markers)
        if upto > state.sent:
            delta["content"] = text[state.sent:upto]
            state.sent = upto

    def _finish(self, state: _ChoiceState, delta: dict[str, Any], choice: dict[str, Any]) -> None:
        parsed = self.plan.parse(state.text)
        content = parsed.content or ""
        if not content.startswith(state.text[:state.sent]):  # cannot happen with the parsers here
            content = state.text[:state.sent] + content
        rest = content[state.sent:]
        if rest:
            delta["content"] = rest
        if parsed.calls:
            delta["tool_calls"] = [
                {"index": i, "id": new_call_id(), "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(parsed.calls)]
            if choice["finish_reason"] == "stop":
                choice["finish_reason"] = "tool_calls"

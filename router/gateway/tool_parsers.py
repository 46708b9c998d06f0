"""Tool-call parsers: a model's generated text -> (content, tool calls), one per model family.

Pure functions over text, named as vLLM's `--tool-call-parser` names them:
- `hermes` (Hermes, Qwen 2.5 / 3, and the SmolLM2 tool template Baton ships):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks; the text before the first
  block is the content. An unclosed last block (generation stopped) is parsed too.
- `llama3_json` (Llama 3.1 / 3.2 / 3.3 custom tools): the whole output, after an optional
  `<|python_tag|>`, is one JSON object `{"name": ..., "parameters": {...}}` or several
  separated by `;`. Output that does not start with `{` (or the tag) is plain content.
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` objects (v3 format), or
  `[TOOL_CALLS]name[ARGS]{...}` repeated (v11+ format); text before the marker is content.

Every parser returns `ParsedOutput(content, calls)`; when no call parses, the whole text is the
content and `calls` is empty (nothing the model wrote is lost). `detect_parser(template)` names
the parser a chat template's own tool syntax implies (None when it shows none).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass
class ParsedOutput:
    """What a completion's text says: content (None when empty) and tool calls."""

    content: Optional[str]
    calls: list[ToolCall] = field(default_factory=list)


def _call_from(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> Optional[ToolCall]:
    """A ToolCall from a decoded {"name", "arguments" | "parameters"} object, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models quote the arguments object
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(text: str) -> Optional[str]:
    return text or None


def _unparsed(text: str) -> ParsedOutput:
    return ParsedOutput(_content(text), [])


# ---------------------------------------------------------------------------- hermes

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def parse_hermes(text: str) -> ParsedOutput:
    """`<tool_call>{json}</tool_call>` blocks (see the module doc)."""
    start = text.find(HERMES_START)
    if start < 0:
        return _unparsed(text)
    calls = []
    for match in _HERMES_BLOCK.finditer(text, start):
        body = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
        try:
            call = _call_from(json.loads(body))
        except ValueError:
            call = None
        if call is None:
            return _unparsed(text)
        calls.append(call)
    return ParsedOutput(_content(text[:start]), calls)


# ---------------------------------------------------------------------------- llama 3 JSON

LLAMA3_TAG = "<|python_tag|>"


def parse_llama3_json(text: str) -> ParsedOutput:
    """One or more `{"name", "parameters"}` objects separated by `;` (see the module doc)."""
    body = text.strip()
    if body.startswith(LLAMA3_TAG):
        body = body[len(LLAMA3_TAG):].lstrip()
    if not body.startswith("{"):
        return _unparsed(text)
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            return _unparsed(text)
        call = _call_from(obj, ("parameters", "arguments"))
        if call is None:
            return _unparsed(text)
        calls.append(call)
        rest = body[end:].lstrip()
        if not rest:
            break
        if not rest.startswith(";"):
            return _unparsed(text)
        pos = len(body) - len(rest[1:].lstrip())
    return ParsedOutput(None, calls) if calls else _unparsed(text)


# ---------------------------------------------------------------------------- mistral

MISTRAL_TOKEN, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


def _mistral_v11(sections: list[str]) -> Optional[list[ToolCall]]:
    calls = []
    decoder = json.JSONDecoder()
    for section in sections:
        name, sep, rest = section.partition(MISTRAL_ARGS)
        if not sep or not name.strip():
            return None
        try:
            args, _ = decoder.raw_decode(rest.strip())
        except ValueError:
            return None
        call = _call_from({"name": name.strip(), "arguments": args})
        if call is None:
            return None
        calls.append(call)
    return calls


def parse_mistral(text: str) -> ParsedOutput:
    """`[TOOL_CALLS][{...}, ...]` or `[TOOL_CALLS]name[ARGS]{...}` (see the module doc)."""
    start = text.find(MISTRAL_TOKEN)
    if start < 0:
        return _unparsed(text)
    sections = [s for s in text[start:].split(MISTRAL_TOKEN) if s.strip()]
    calls: Optional[list[ToolCall]] = []
    if sections and sections[0].lstrip().startswith(("[", "{")):
        decoder = json.JSONDecoder()
        for section in sections:
            try:
                obj, _ = decoder.raw_decode(section.strip())
            except ValueError:
                return _unparsed(text)
            for item in obj if isinstance(obj, list) else [obj]:
                call = _call_from(item)
                if call is None:
                    return _unparsed(text)
                calls.append(call)
    else:
        calls = _mistral_v11(sections)
    if not calls:
        return _unparsed(text)
    return ParsedOutput(_content(text[:start]), calls)


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ToolParser:
    """A parser and what streaming and sampling need to know about its syntax."""

    name: str
    parse: Callable[[str], ParsedOutput]
    markers: tuple[str, ...]
    """Texts that begin a tool call: streamed content stops before one (and any prefix of one)."""
    at_start_only: bool = False
    """Calls are recognized only at the very start of the output (after whitespace)."""
    special_tokens: bool = False
    """Its markers are special tokens, so the output must keep special tokens to show them."""


PARSERS: dict[str, ToolParser] = {
    "hermes": ToolParser("hermes", parse_hermes, (HERMES_START,)),
    "llama3_json": ToolParser("llama3_json", parse_llama3_json, (LLAMA3_TAG, "{"), at_start_only=True,
                              special_tokens=True),
    "mistral": ToolParser("mistral", parse_mistral, (MISTRAL_TOKEN,), special_tokens=True),
}
"""Every parser by its `--tool-call-parser` name."""

ALIASES = {"qwen": "hermes", "qwen25": "hermes", "llama3": "llama3_json", "llama": "llama3_json"}


def get_parser(name: str) -> ToolParser:
    """The parser of a name (or alias); ValueError naming the known ones otherwise."""
    key = ALIASES.get(name, name)
    if key not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(PARSERS))}")
    return PARSERS[key]


def detect_parser(template: Optional[str]) -> Optional[str]:
    """The parser a chat template's tool syntax implies, or None."""
    if not template:
        return None
    if HERMES_START in template:
        return "hermes"
    if MISTRAL_TOKEN in template:
        return "mistral"
    if LLAMA3_TAG in template or "ipython" in template:
        return "llama3_json"
    return None


def resolve_parser(name: str, chat_template: Optional[str]) -> Optional[ToolParser]:
    """The router's parser: the one named (`--tool-call-parser`; ValueError when unknown), else the
    one the chat template implies, else None (tool_choice auto is then refused)."""
    if name:
        return get_parser(name)
    detected = detect_parser(chat_template)
    return PARSERS[detected] if detected else None

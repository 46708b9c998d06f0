"""`POST /v1/responses`, OpenAI's Responses API, served statelessly over the chat path.

A request becomes a chat request (`to_chat`): `instructions` is a system message first; `input`
is a string (one user message) or a list of items: messages (`role` + text content or
`input_text` / `output_text` parts), `function_call` items (an assistant's tool calls) and
`function_call_output` items (tool results). `max_output_tokens`, `temperature`, `top_p`,
`text.format` (`text`, `json_object`, `json_schema`: the structured-output path) and function
`tools` / `tool_choice` / `parallel_tool_calls` (tools.py) map to their chat fields. The answer
is a `response` object whose `output` holds a `message` item (`output_text` content) and a
`function_call` item per tool call; streamed, it is the sequence of events `responses_stream.py`
writes, ending with `response.completed`.

Stateless: nothing is stored. `store` is answered `false` (a request asking for `store: true`
is a 400), and `previous_response_id`, `conversation` and `background` are 400s saying so.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from baton.router.gateway.errors import invalid_request
from baton.router.gateway.protocol import ChatCompletionRequest
from baton.router.gateway.tools import ToolPlan


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    """Text (one user message) or a list of message / function_call / function_call_output items."""
    instructions: Optional[str] = None
    """A system message put before the input."""
    max_output_tokens: Optional[int] = Field(default=None, ge=1, lt=2**32)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stream: Optional[bool] = False
    store: Optional[bool] = None
    """Only false (or absent): responses are not stored."""
    previous_response_id: Optional[str] = None
    """Not supported (400): send the whole conversation in `input`."""
    text: Optional[dict[str, Any]] = None
    """`{"format": {"type": "text" | "json_object" | "json_schema", "name", "schema", "strict"}}`."""
    tools: Optional[list[dict[str, Any]]] = None
    """Function tools: `{"type": "function", "name", "description", "parameters"}`."""
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    seed: Optional[int] = None
    conversation: Optional[Any] = None
    background: Optional[bool] = None


_TEXT_PARTS = {"input_text", "output_text", "text"}


def _item_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request("content must be a string or a list of parts", param=where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise invalid_request(f"content part type {kind!r} is not supported; only text parts are",
                                  param=f"{where}.{i}")
        texts.append(str(part.get("text") or ""))
    return "\n".join(texts)


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat messages of a Responses request (instructions, then the input items)."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    for i, item in enumerate(body.input):
        where = f"input.{i}"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid_request(f"message role {role!r} is not supported", param=f"{where}.role")
            messages.append({"role": role, "content": _item_text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or f"call_{i}", "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if not isinstance(call["function"]["name"], str):
                raise invalid_request("a function_call item needs a name", param=f"{where}.name")
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _item_text(output, f"{where}.output")})
        else:
            raise invalid_request(f"input item type {kind!r} is not supported; give message, function_call "
                                  "or function_call_output items", param=where)
    if not messages:
        raise invalid_request("input must not be empty", param="input")
    return messages


def _response_format(text: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    fmt = (text or {}).get("format")
    if not fmt:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise invalid_request("text.format.schema is required for type json_schema", param="text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"],
                                                       "strict": fmt.get("strict")}}
    raise invalid_request(f"text.format type {kind!r} is not supported; give text, json_object or json_schema",
                          param="text.format.type")


def _chat_tools(tools: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid_request(f"tool type {kind!r} is not supported; only function tools are",
                                  param=f"tools.{i}")
        spec = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": spec})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def check_stateless(body: ResponsesRequest) -> None:
    """400 for what needs stored state."""
    if body.previous_response_id:
        raise invalid_request("previous_response_id is not supported: this server stores no responses; "
                              "send the whole conversation in input", param="previous_response_id")
    if body.store:
        raise invalid_request("store: true is not supported: this server stores no responses; send store: false",
                              param="store")
    if body.conversation is not None:
        raise invalid_request("conversation is not supported: this server stores no conversations",
                              param="conversation")
    if body.background:
        raise invalid_request("background is not supported: responses are served while the request waits",
                              param="background")


def to_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request stands for (400 for what cannot be served)."""
    check_stateless(body)
    chat: dict[str, Any] = {"model": body.model, "messages": input_messages(body),
                            "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature,
                            "top_p": body.top_p, "stream": bool(body.stream), "seed": body.seed,
                            "response_format": _response_format(body.text), "tools": _chat_tools(body.tools),
                            "tool_choice": _chat_tool_choice(body.tool_choice),
                            "parallel_tool_calls": body.parallel_tool_calls}
    return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})


# ---------------------------------------------------------------------------- response objects


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [text_part(text)] if status == "completed" else []}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def usage_of(chat_usage: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not chat_usage:
        return None
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


class ResponseShell:
    """The fields of a `response` object that do not depend on the output."""

    def __init__(self, body: ResponsesRequest, model: str, plan: ToolPlan) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.body, self.model, self.plan = body, model, plan

    def object(self, status: str, output: list[dict[str, Any]], usage: Optional[dict[str, Any]] = None,
               incomplete: Optional[str] = None) -> dict[str, Any]:
        body = self.body
        fmt = (body.text or {}).get("format") or {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": body.temperature, "top_p": body.top_p, "text": {"format": fmt},
            "tool_choice": body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none"),
            "tools": body.tools or [], "truncation": "disabled", "usage": usage, "user": body.user,
            "metadata": body.metadata or {},
        }


def status_of(finish_reason: Optional[str]) -> tuple[str, Optional[str]]:
    """(status, incomplete reason) for a chat finish_reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


def response_from_completion(shell: ResponseShell, completion: dict[str, Any]) -> dict[str, Any]:
    """The `response` object of a finished (tool-parsed) `chat.completion` object."""
    choice = completion["choices"][0]
    message = choice["message"]
    output = []
    if message.get("content") or not message.get("tool_calls"):
        output.append(message_item(new_id("msg"), message.get("content") or ""))
    for call in message.get("tool_calls") or []:
        output.append(function_call_item(new_id("fc"), call["id"], call["function"]["name"],
                                         call["function"]["arguments"]))
    status, incomplete = status_of(choice["finish_reason"])
    return shell.object(status, output, usage_of(completion.get("usage")), incomplete)


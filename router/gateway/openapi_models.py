"""Pydantic models of the gateway's response bodies, for the OpenAPI document only
(openapi_doc.py): the gateway builds its answers as plain dicts (responses.py, tools.py,
responses_api.py, embeddings.py); these models describe them, so clients and fuzzers can
check them. Every model allows extra fields (OpenAI adds fields over time)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_Open):
    """Every error the gateway sends (OpenAI's shape)."""

    error: ErrorDetail


class PromptTokensDetails(_Open):
    cached_tokens: int


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class FunctionCall(_Open):
    name: str
    arguments: str
    """JSON text of the arguments."""


class ToolCallObject(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallObject]] = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: str
    stop_reason: Optional[Union[str, int]] = None


class ChatCompletion(_Open):
    """`POST /v1/chat/completions` without `stream` (streamed: `chat.completion.chunk` SSE events)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: str
    stop_reason: Optional[Union[str, int]] = None


class TextCompletion(_Open):
    """`POST /v1/completions` without `stream` (streamed: `text_completion` SSE events)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class ResponseOutputItem(_Open):
    type: str
    """message | function_call."""
    id: str
    status: str


class ResponseUsage(_Open):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ResponseObject(_Open):
    """`POST /v1/responses` without `stream` (streamed: `response.*` SSE events)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: str
    model: str
    output: list[ResponseOutputItem]
    usage: Optional[ResponseUsage] = None
    store: bool


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Open):
    prompt: str


class SelectChoice(_Open):
    index: int
    text: str
    score: float
    logprob: float
    num_tokens: int


class SelectResponse(_Open):
    """`POST /v1/select`: the scores of every choice (docs/lang.md)."""

    id: str
    object: Literal["select"]
    created: int
    model: str
    choices: list[SelectChoice]
    selected: int
    prefix_tokens: int
    usage: Usage

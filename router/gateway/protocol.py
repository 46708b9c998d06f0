"""Pydantic models of the OpenAI request bodies the gateway accepts.

`ChatCompletionRequest` (`POST /v1/chat/completions`) and `CompletionRequest`
(`POST /v1/completions`) take what the official `openai` client sends, plus the vLLM-style
extras (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`regex`, `ebnf`, `priority`, `skip_special_tokens`, `include_stop_str_in_output`).

Conventions:
- every field is optional and an explicit `null` means "not given" (some SDKs send nulls);
- unknown fields are ignored (`extra="ignore"`); chat messages keep theirs (`extra="allow"`)
  so e.g. `tool_calls` or `name` still reach the chat template;
- ranges are checked here (they mirror the engine's own checks) so a bad value is a 400
  from the gateway, not a round trip to a worker. Checks that need the tokenizer or the
  context length (prompt too long, max_tokens defaulting) live in `convert.py`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_INT32 = 2**31
_UINT32 = 2**32
_UINT64 = 2**64

NonNegativeTokenId = Annotated[int, Field(ge=0, lt=_UINT32)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: Optional[bool] = False
    """Send one more chunk before `[DONE]` with the whole request's usage and no choices."""
    continuous_usage_stats: Optional[bool] = False
    """With include_usage: every chunk also carries the usage so far (vLLM's extension), so a
    client can count the tokens each event carries."""


class JsonSchemaFormat(_Body):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class ContentPart(BaseModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` can be served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None


class SamplingBody(_Body):
    """The fields chat and completions requests share."""

    model: Optional[str] = None
    """The served model's name; absent means the served model."""
    max_tokens: Optional[int] = Field(default=None, ge=1, lt=_UINT32)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: Optional[int] = Field(default=1, ge=1, le=128)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), lt=_UINT64)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    response_format: Optional[ResponseFormat] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # Extras beyond the OpenAI API (vLLM / SGLang names).
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    top_k: Optional[int] = Field(default=None, ge=-1, lt=_INT32)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False)
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[int] = Field(default=0, ge=0, lt=_UINT32)
    stop_token_ids: Optional[list[NonNegativeTokenId]] = None
    priority: Optional[int] = Field(default=0, ge=-_INT32, lt=_INT32)
    skip_special_tokens: Optional[bool] = True
    include_stop_str_in_output: Optional[bool] = False

    @field_validator("stop")
    @classmethod
    def _stop_strings_non_empty(cls, value: Optional[Union[str, list[str]]]):
        strings = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in strings):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingBody):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, lt=_UINT32)
    """Preferred over `max_tokens` (OpenAI deprecated the latter for chat)."""
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    """With tool_choice `required`: false allows exactly one call (default: one or more)."""
    functions: Optional[Any] = None
    """Deprecated by OpenAI for `tools`: refused with a 400 saying so (as `function_call`)."""
    function_call: Optional[Any] = None
    audio: Optional[Any] = None
    """Audio output is not served (400)."""
    modalities: Optional[list[str]] = None
    """Only `["text"]` is served."""
    prediction: Optional[Any] = None
    """Predicted outputs are not served (400)."""
    web_search_options: Optional[Any] = None
    """Web search is not served (400)."""
    chat_template_kwargs: Optional[dict[str, Any]] = None
    """Extra variables for the chat template (e.g. `{"enable_thinking": false}`)."""
    add_generation_prompt: Optional[bool] = None
    """Open the assistant's turn after the messages (vLLM's name); absent: yes, unless continue_final_message."""
    continue_final_message: Optional[bool] = False
    """Leave the final (assistant) message open and continue it (vLLM's name): a reply's prefix."""

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingBody):
    """`POST /v1/completions`: one prompt, as text or token ids (a one-element batch is accepted)."""

    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(default=None, ge=0, lt=_UINT32)
    """0 is allowed with `echo` only (score the prompt, generate nothing)."""
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: Optional[bool] = False
    """Put the prompt in front of the completion (with `logprobs`: its tokens' logprobs too)."""
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    @property
    def prompt_text(self) -> Optional[str]:
        """The prompt when given as text (a one-element batch included), else None."""
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else None

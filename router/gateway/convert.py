"""OpenAI request bodies -> what the router core takes: prompt token ids and the wire
`common_pb2.SamplingParams`.

- chat: the tokenizer's chat template (`render_chat`): by default with the generation prompt;
  with `continue_final_message` (vLLM's extension) the final assistant message is left open and
  the model continues it (an empty one is the same as the generation prompt). Content given as
  a list of text parts is joined with newlines (templates of text models expect a string);
  other part types are a 400.
- completions: `tokenizer.encode(prompt)` for text, or the token ids as given. `echo` puts the
  prompt (and, with `logprobs`, its tokens' logprobs: `prompt_logprobs` on the wire) in front of
  each completion; `max_tokens: 0` is allowed with echo only (the prompt is scored, one token
  is generated and dropped, as vLLM does).
- `max_tokens` is always set on the wire: absent means the rest of the context
  (`max_model_len - prompt length`); prompt + max_tokens beyond the context is a 400 with
  OpenAI's "maximum context length" wording (`code="context_length_exceeded"`).
- `response_format` / `regex` / `ebnf` become the `StructuredOutput` oneof (at most one).
- `tools` / `tool_choice`: planned in tools.py (the tools go to the template; `required` and a
  named function constrain the output).
Every problem raises `ApiError` (400) naming the field in `param`.

The response side (OpenAI response objects and stream chunks) is in `responses.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.errors import ApiError, invalid_request
from baton.router.gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingBody
from baton.router.gateway.media import has_images, template_content

if TYPE_CHECKING:
    from baton.router.gateway.tools import ToolPlan

_UINT64_MASK = 2**64 - 1


@dataclass
class EchoPrompt:
    """What `echo` puts in front of every completion of a completions request."""

    text: str
    token_ids: list[int]
    only: bool = False
    """`max_tokens: 0`: the one token generated is dropped; the answer is the prompt alone."""


@dataclass
class PreparedRequest:
    """What the gateway hands to the core for one OpenAI request."""

    prompt_token_ids: list[int]
    params: common_pb2.SamplingParams
    echo: Optional[EchoPrompt] = None


def check_model(requested: Optional[str], served: str) -> None:
    """404 (OpenAI's `model_not_found`) when the body names a model other than the served one."""
    if requested and requested != served:
        raise ApiError(404, f"The model `{requested}` does not exist.", param="model", code="model_not_found")


# ---------------------------------------------------------------------------- prompts


def _text_content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text":
            raise invalid_request(
                f"content part type {part.type!r} is not supported; only text parts are",
                param=f"messages.{index}.content")
        texts.append(part.text or "")
    return "\n".join(texts)


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template (content flattened to a string)."""
    plain = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if has_images(message.content):  # image parts stay parts: the model's template places them
            item["content"] = template_content(message.content)
        else:
            item["content"] = _text_content(message.content, i)
        plain.append(item)
    return plain


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as plain dicts for the chat template."""
    return plain_messages(body.messages)


def _as_id_list(result: Any) -> list[int]:
    """apply_chat_template's result as a flat id list (it may be a list or a BatchEncoding)."""
    if isinstance(result, dict) or hasattr(result, "keys"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    if result and isinstance(result[0], (list, tuple)):  # a batch of one
        result = result[0]
    return [int(t) for t in result]


def render_chat(messages: list[dict[str, Any]], tokenizer, *, add_generation_prompt: Optional[bool] = None,
                continue_final_message: bool = False, template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
    """The chat rendered with the model's template and tokenized; a template error is a 400.

    `add_generation_prompt` None means True unless `continue_final_message`, which leaves the final
    (assistant) message open for the model to continue; an empty final message to continue is the
    same as the generation prompt."""
    if continue_final_message:
        if add_generation_prompt:
            raise invalid_request("give at most one of add_generation_prompt and continue_final_message",
                                  param="continue_final_message")
        if not messages or messages[-1].get("role") != "assistant":
            raise invalid_request("continue_final_message needs the last message to be the assistant's",
                                  param="continue_final_message")
        if not messages[-1].get("content"):
            messages, add_generation_prompt, continue_final_message = messages[:-1], True, False
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    try:
        result = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=True, **dict(template_kwargs or {}))
    except ApiError:
        raise
    except Exception as e:  # jinja TemplateError, missing template (ValueError), bad kwargs
        raise invalid_request(f"the chat template cannot render these messages: {e}", param="messages") from e
    return _as_id_list(result)


def chat_prompt_ids(body: ChatCompletionRequest, tokenizer, plan: Optional["ToolPlan"] = None) -> list[int]:
    """Render and tokenize the chat with the model's template (with the plan's tools, tools.py);
    a template error is a 400."""
    from baton.router.gateway.tools import tool_messages
    template_kwargs = dict(body.chat_template_kwargs or {})
    tools = plan.template_tools() if plan is not None else None
    if tools:
        template_kwargs["tools"] = tools
    return render_chat(tool_messages(chat_messages(body)), tokenizer, add_generation_prompt=body.add_generation_prompt,
                       continue_final_message=bool(body.continue_final_message),
                       template_kwargs=template_kwargs)


def completion_prompt_ids(body: CompletionRequest, tokenizer) -> list[int]:
    """The prompt's token ids: text is encoded (with the tokenizer's special tokens, e.g. BOS),
    token ids are checked against the vocabulary. A batch of more than one prompt is a 400."""
    prompt: Union[str, list] = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid_request("batched prompts are not supported; send one prompt per request",
                                  param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return [int(t) for t in tokenizer.encode(prompt)]
    vocab = len(tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise invalid_request(f"prompt token id {bad[0]} is out of range [0, {vocab})", param="prompt")
    return list(prompt)


# ---------------------------------------------------------------------------- limits


def resolve_max_tokens(requested: Optional[int], prompt_len: int, max_model_len: int, *, chat: bool) -> int:
    """The completion budget: as requested, or the rest of the context; 400 when it cannot fit."""
    what = "messages" if chat else "prompt"
    if prompt_len == 0:
        raise invalid_request(f"the {what} must not be empty", param=what)
    if requested is None:
        if prompt_len >= max_model_len:
            raise invalid_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
                f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
                param=what, code="context_length_exceeded")
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        if chat:
            detail = (f"({prompt_len} in the messages, {requested} in the completion). "
                      "Please reduce the length of the messages or completion.")
        else:
            detail = (f"({prompt_len} in your prompt; {requested} for the completion). "
                      "Please reduce your prompt; or completion length.")
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens {detail}", param=what, code="context_length_exceeded")
    return requested


# ---------------------------------------------------------------------------- sampling


def structured_output(body: SamplingBody) -> Optional[common_pb2.StructuredOutput]:
    """response_format / regex / ebnf as the wire oneof; None when unconstrained."""
    given: list[tuple[str, common_pb2.StructuredOutput]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", common_pb2.StructuredOutput(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid_request("response_format.json_schema.schema is required for type json_schema",
                                  param="response_format.json_schema")
        given.append(("response_format",
                      common_pb2.StructuredOutput(json_schema=json.dumps(fmt.json_schema.schema_))))
    if body.regex is not None:
        given.append(("regex", common_pb2.StructuredOutput(regex=body.regex)))
    if body.ebnf is not None:
        given.append(("ebnf", common_pb2.StructuredOutput(ebnf=body.ebnf)))
    if len(given) > 1:
        raise invalid_request("give at most one of response_format (json), regex and ebnf",
                              param=given[1][0])
    return given[0][1] if given else None


def _check_unsupported(body: SamplingBody) -> None:
    if body.logit_bias:
        raise invalid_request("logit_bias is not supported", param="logit_bias")
    if isinstance(body, ChatCompletionRequest):
        for name, what in (("functions", "functions (deprecated) are not supported; give tools"),
                           ("function_call", "function_call (deprecated) is not supported; give tool_choice"),
                           ("audio", "audio output is not supported"),
                           ("prediction", "predicted outputs (prediction) are not supported"),
                           ("web_search_options", "web search is not supported")):
            if getattr(body, name) is not None:
                raise invalid_request(what, param=name)
        if body.modalities is not None and set(body.modalities) - {"text"}:
            raise invalid_request("only the text modality is served", param="modalities")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise invalid_request("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise invalid_request("best_of other than n is not supported", param="best_of")


def sampling_params(body: SamplingBody, max_tokens: int) -> common_pb2.SamplingParams:
    """The wire SamplingParams for a body (chat or completions) and a resolved max_tokens."""
    _check_unsupported(body)
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        raise invalid_request(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})",
                              param="min_tokens")
    top_k = body.top_k or 0
    msg = common_pb2.SamplingParams(
        n=body.n or 1,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        top_k=0 if top_k == -1 else top_k,
        min_p=body.min_p or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        stop=body.stop_list,
        stop_token_ids=body.stop_token_ids or [],
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        ignore_eos=bool(body.ignore_eos),
        keep_special_tokens=body.skip_special_tokens is False,
        priority=body.priority or 0,
    )
    if body.temperature is not None:
        msg.temperature = body.temperature
    if body.top_p is not None:
        msg.top_p = body.top_p
    if body.repetition_penalty is not None:
        msg.repetition_penalty = body.repetition_penalty
    if body.seed is not None:
        msg.seed = body.seed & _UINT64_MASK  # negative seeds wrap to uint64
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs:
            msg.logprobs = body.top_logprobs or 0
    elif isinstance(body, CompletionRequest) and body.logprobs is not None:
        msg.logprobs = body.logprobs
        if body.echo:
            msg.prompt_logprobs = body.logprobs
    constraint = structured_output(body)
    if constraint is not None:
        msg.structured_output.CopyFrom(constraint)
    return msg


def prepare_chat(body: ChatCompletionRequest, tokenizer, max_model_len: int,
                 plan: Optional["ToolPlan"] = None) -> PreparedRequest:
    """Tokenize a chat request and map its parameters; raises ApiError (400). `plan`: its tools
    (tools.py; None: planned here with no tool-call parser)."""
    if plan is None:
        from baton.router.gateway.tools import plan_tools
        plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, None)
    ids = chat_prompt_ids(body, tokenizer, plan)
    max_tokens = resolve_max_tokens(body.requested_max_tokens, len(ids), max_model_len, chat=True)
    params = sampling_params(body, max_tokens)
    plan.constrain(params)
    return PreparedRequest(ids, params)


def prepare_completion(body: CompletionRequest, tokenizer, max_model_len: int) -> PreparedRequest:
    """Tokenize a completions request and map its parameters; raises ApiError (400)."""
    ids = completion_prompt_ids(body, tokenizer)
    requested = body.requested_max_tokens
    echo_only = requested == 0
    if echo_only and not body.echo:
        raise invalid_request("max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens")
    max_tokens = resolve_max_tokens(1 if echo_only else requested, len(ids), max_model_len, chat=False)
    if echo_only and body.min_tokens:
        raise invalid_request("min_tokens must be 0 when max_tokens is 0", param="min_tokens")
    echo = None
    if body.echo:
        text = body.prompt_text if body.prompt_text is not None else tokenizer.decode(ids)
        echo = EchoPrompt(text=text, token_ids=ids, only=echo_only)
    return PreparedRequest(ids, sampling_params(body, max_tokens), echo)

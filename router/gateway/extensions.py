"""The gateway's routes beyond the OpenAI API (what the frontend language's `RuntimeEndpoint`
needs; docs/lang.md describes them):

- `POST /v1/select`: score a few continuations of a prompt or a chat (router/gateway/select.py);
- `POST /tokenize`: a prompt, or chat messages rendered with the model's template (with
  `add_generation_prompt` / `continue_final_message`), as token ids (vLLM's route and fields);
- `POST /detokenize`: token ids back to text (vLLM's route).
They sit behind the same API keys as `/v1/*` (the caller passes the dependency).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from baton.router.gateway.convert import check_model, plain_messages, render_chat
from baton.router.gateway.errors import invalid_request
from baton.router.gateway.protocol import ChatMessage
from baton.router.gateway.select import MAX_CHOICES, choice_prompts, run_select
from baton.router.types import RouterCoreAPI


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _ChatFields(_Body):
    model: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def plain_messages(self) -> Optional[list[dict[str, Any]]]:
        """The messages as template dicts (text content only), or None."""
        return None if self.messages is None else plain_messages(self.messages)


class SelectRequest(_ChatFields):
    """`POST /v1/select`: exactly one of `prompt` (text) and `messages`."""

    prompt: Optional[str] = None
    choices: list[str] = Field(min_length=1, max_length=MAX_CHOICES)
    continue_final_message: Optional[bool] = False
    """With messages: a choice continues the final (assistant) message; else it starts the assistant's reply."""


class TokenizeRequest(_ChatFields):
    """`POST /tokenize`: exactly one of `prompt` and `messages`."""

    prompt: Optional[str] = None
    add_special_tokens: Optional[bool] = True
    """For a prompt: the tokenizer's special tokens (e.g. BOS), as /v1/completions encodes it."""
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = False


class DetokenizeRequest(_Body):
    """`POST /detokenize`."""

    model: Optional[str] = None
    tokens: list[int]


def _tokenize(body: TokenizeRequest, tokenizer) -> list[int]:
    messages = body.plain_messages()
    if (body.prompt is None) == (messages is None):
        raise invalid_request("give exactly one of prompt and messages", param="prompt")
    if body.prompt is not None:
        return list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False))
    return render_chat(messages, tokenizer, add_generation_prompt=body.add_generation_prompt,
                       continue_final_message=bool(body.continue_final_message),
                       template_kwargs=body.chat_template_kwargs)


def _detokenize(body: DetokenizeRequest, tokenizer) -> str:
    vocab = len(tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise invalid_request(f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
    return tokenizer.decode(body.tokens)


def extension_routes(core: RouterCoreAPI, dependencies: list) -> tuple[APIRouter, APIRouter]:
    """(routes under /v1, routes at the root), both behind `dependencies` (the API keys)."""
    v1 = APIRouter(prefix="/v1", dependencies=dependencies)
    root = APIRouter(dependencies=dependencies)

    @v1.post("/select")
    async def select(request: Request) -> dict[str, Any]:
        body = SelectRequest.model_validate_json(await request.body())
        check_model(body.model, core.model_name)
        full, shared = await asyncio.to_thread(
            choice_prompts, core.tokenizer, body.choices, prompt=body.prompt, messages=body.plain_messages(),
            continue_final_message=bool(body.continue_final_message), template_kwargs=body.chat_template_kwargs)
        return await run_select(core, body.choices, full, shared)

    @root.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Union[int, list[int]]]:
        body = TokenizeRequest.model_validate_json(await request.body())
        check_model(body.model, core.model_name)
        tokens = await asyncio.to_thread(_tokenize, body, core.tokenizer)
        return {"count": len(tokens), "max_model_len": core.max_model_len, "tokens": tokens}

    @root.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, str]:
        body = DetokenizeRequest.model_validate_json(await request.body())
        check_model(body.model, core.model_name)
        return {"prompt": await asyncio.to_thread(_detokenize, body, core.tokenizer)}

    return v1, root

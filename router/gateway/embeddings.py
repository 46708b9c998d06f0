"""`POST /v1/embeddings`: embeddings from the served decoder model (docs/openai_api.md).

The input (a string, a list of strings, a list of token ids, or a list of token-id lists) is
tokenized here (text with the tokenizer's special tokens, as /v1/completions encodes it) and
sent to one decode worker (`core.embed`, router/embedding.py), which runs each input through
the model and pools its final hidden states: the last token's (vLLM's default for decoder
models), L2-normalized unless the body says `"normalize": false` (vLLM's extension).
`encoding_format` `float` gives lists of numbers, `base64` the float32 little-endian bytes in
base64 (what the official client asks for and decodes). `dimensions` is refused: the vectors
have the model's hidden size and no shorter (Matryoshka) form is served.
"""
from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from baton.router.gateway.convert import check_model
from baton.router.gateway.errors import invalid_request
from baton.router.types import RouterCoreAPI

MAX_INPUTS = 2048
"""Inputs in one request (OpenAI's limit)."""


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    """The served model's name; absent means the served model."""
    input: Union[str, list[str], list[int], list[list[int]]]
    """Text, texts, token ids, or token-id lists to embed (at most 2048 inputs)."""
    encoding_format: Optional[Literal["float", "base64"]] = "float"
    dimensions: Optional[int] = None
    """Not supported (400): the embeddings have the model's hidden size."""
    user: Optional[str] = None
    normalize: Optional[bool] = True
    """L2-normalize each vector (vLLM's extension; default true)."""


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]
    """The vector, or its float32 little-endian bytes in base64 (`encoding_format: base64`)."""


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """The answer of `POST /v1/embeddings`."""

    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


def embedding_inputs(body: EmbeddingRequest, tokenizer, max_model_len: int) -> list[list[int]]:
    """Every input as token ids; 400 for an empty, out-of-vocabulary or too long input."""
    raw: Any = body.input
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise invalid_request("input must not be empty", param="input")
    if len(raw) > MAX_INPUTS:
        raise invalid_request(f"at most {MAX_INPUTS} inputs per request, not {len(raw)}", param="input")
    vocab = len(tokenizer)
    inputs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            ids = [int(t) for t in tokenizer.encode(item)]
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise invalid_request(f"input {i}: token id {bad[0]} is out of range [0, {vocab})", param="input")
        if not ids:
            raise invalid_request(f"input {i} is empty", param="input")
        if len(ids) > max_model_len:
            raise invalid_request(
                f"This model's maximum context length is {max_model_len} tokens. However, input {i} resulted "
                f"in {len(ids)} tokens. Please reduce the length of the input.", param="input",
                code="context_length_exceeded")
        inputs.append(ids)
    return inputs


def encode_vector(vector: list[float], encoding_format: str) -> Union[list[float], str]:
    """The vector as the client asked for it."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embedding_routes(core: RouterCoreAPI, dependencies: list) -> APIRouter:
    """The /v1/embeddings route, behind `dependencies` (the API keys)."""
    v1 = APIRouter(prefix="/v1", dependencies=dependencies)

    @v1.post("/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = EmbeddingRequest.model_validate_json(await request.body())
        check_model(body.model, core.model_name)
        if body.dimensions is not None:
            raise invalid_request("dimensions is not supported: the embeddings of this model have its hidden "
                                  "size, and no shortened form is served", param="dimensions")
        inputs = await asyncio.to_thread(embedding_inputs, body, core.tokenizer, core.max_model_len)
        result = await core.embed(inputs, normalize=body.normalize is not False)
        fmt = body.encoding_format or "float"
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
                for i, v in enumerate(result.vectors)]
        return {"object": "list", "data": data, "model": core.model_name,
                "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}

    return v1

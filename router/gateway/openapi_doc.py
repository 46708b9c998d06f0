"""The gateway's OpenAPI document: every request and response body, and the status codes the
gateway really sends.

The routes read their bodies themselves (as JSON whatever the Content-Type, errors as 400s), so
FastAPI cannot see them; `install_openapi(app)` replaces `app.openapi` with a builder that starts
from FastAPI's document and then, per route: puts in the request body's schema (the pydantic
models of protocol.py, extensions.py, responses_api.py, embeddings.py), the 200 answer's schema
(openapi_models.py; `text/event-stream` as well where `stream` is allowed), and the error
answers in OpenAI's shape: 400 (bad body, unknown model name is a 404), 401 (API keys), 404,
413 (body too large), 429 (full), 503 (no worker), 504 (deadline) as each route can send
them; any other route gets the error answers every route can give (400, 401, 403, 404, 413).
FastAPI's 422 is removed: validation errors are 400s (errors.py).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from baton.router.gateway import openapi_models as out
from baton.router.gateway.embeddings import EmbeddingRequest, EmbeddingResponse
from baton.router.gateway.extensions import DetokenizeRequest, SelectRequest, TokenizeRequest
from baton.router.gateway.protocol import ChatCompletionRequest, CompletionRequest
from baton.router.gateway.responses_api import ResponsesRequest

_REF = "#/components/schemas/{model}"

ERROR_DESCRIPTIONS = {
    "400": "Invalid request (the body or a parameter; `param` names it), or something not served",
    "401": "Missing or wrong API key (when the router has keys)",
    "403": "A client key on an admin route",
    "404": "Unknown model, route or request",
    "413": "Request body over the router's limit",
    "429": "The router's queue is full (Retry-After says when to come back)",
    "503": "No healthy worker can serve",
    "504": "The request's deadline passed",
}

_GENERATE = ["400", "401", "404", "413", "429", "503", "504"]
ROUTES: dict[tuple[str, str], tuple[Any, Any, bool, list[str]]] = {
    ("post", "/v1/chat/completions"): (ChatCompletionRequest, out.ChatCompletion, True, _GENERATE),
    ("post", "/v1/completions"): (CompletionRequest, out.TextCompletion, True, _GENERATE),
    ("post", "/v1/responses"): (ResponsesRequest, out.ResponseObject, True, _GENERATE),
    ("post", "/v1/embeddings"): (EmbeddingRequest, EmbeddingResponse, False, _GENERATE),
    ("post", "/v1/select"): (SelectRequest, out.SelectResponse, False, _GENERATE),
    ("post", "/tokenize"): (TokenizeRequest, out.TokenizeResponse, False, ["400", "401", "404", "413"]),
    ("post", "/detokenize"): (DetokenizeRequest, out.DetokenizeResponse, False, ["400", "401", "404", "413"]),
    ("get", "/v1/models"): (None, out.ModelList, False, ["401"]),
    ("get", "/v1/models/{model}"): (None, out.ModelCard, False, ["401", "404"]),
}
"""(method, path) -> (request model, 200 model, may stream, error statuses)."""

TEXT_ROUTES = {("get", "/metrics"): "text/plain", ("get", "/"): "text/html"}
"""Routes whose 200 answer is not JSON: the Prometheus text and the dashboard page."""


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _component_schemas() -> dict[str, Any]:
    requests = [m for m, _, _, _ in ROUTES.values() if m is not None]
    answers = [m for _, m, _, _ in ROUTES.values()] + [out.ErrorResponse]
    pairs = [(m, "validation") for m in requests] + [(m, "serialization") for m in answers]
    _, schema = models_json_schema(pairs, ref_template=_REF)
    return schema.get("$defs", {})


def _error_responses(statuses: list[str]) -> dict[str, Any]:
    return {s: {"description": ERROR_DESCRIPTIONS[s],
                "content": {"application/json": {"schema": _ref(out.ErrorResponse)}}} for s in statuses}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The document (see the module doc)."""
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components.update(_component_schemas())
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            spec = ROUTES.get((method, path))
            if spec is None:  # a route described by FastAPI alone: its errors are still OpenAI's shape
                generic = ["400", "401", "403", "404"] + (["413"] if method in ("post", "put", "patch") else [])
                for status, answer in _error_responses(generic).items():
                    responses.setdefault(status, answer)
                continue
            request, answer, streams, errors = spec
            if request is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
            content: dict[str, Any] = {"application/json": {"schema": _ref(answer)}}
            if streams:
                content["text/event-stream"] = {"schema": {"type": "string"},
                                                "description": "server-sent events when `stream` is true"}
            responses["200"] = {"description": "Successful answer", "content": content}
            responses.update(_error_responses(errors))
    for (method, path), media in TEXT_ROUTES.items():
        op = doc.get("paths", {}).get(path, {}).get(method)
        if op is not None:
            op["responses"]["200"] = {"description": "Successful answer", "content": {media: {"schema": {"type": "string"}}}}
    for op in doc.get("paths", {}).get("/health", {}).values():
        op.setdefault("responses", {})["503"] = {"description": "No healthy decode worker",
                                                 "content": {"application/json": {"schema": {"type": "object"}}}}
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi` as the app's document (built once, on first use)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

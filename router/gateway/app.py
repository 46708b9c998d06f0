"""The OpenAI-compatible HTTP gateway: `create_app(core)` builds the FastAPI app.

Routes:
- `POST /v1/chat/completions`, `POST /v1/completions`: JSON, or SSE when `stream` is true
  (`data: {json}` events, then `data: [DONE]`). An error before the first chunk is a plain
  HTTP error (400 / 401 / 404 / 429 / 503 / 504 / 500, OpenAI body); an error mid-stream is
  one `data: {"error": ...}` event, then the stream closes. A client that disconnects has its
  stream closed, which aborts the request; its response is logged as 499.
- `GET /v1/models`, `GET /v1/models/{model}`: the one served model.
- docs/openai_api.md: tool calling on chat (tools.py), `POST /v1/responses` (responses_route.py),
  `POST /v1/embeddings` (embeddings.py); other paths are 404 / 501 naming them (refusals.py);
  `/openapi.json` describes every body and status (openapi_doc.py).
- Beyond the OpenAI API (extensions.py, docs/lang.md): `POST /v1/select` (score continuations),
  `POST /tokenize` and `POST /detokenize` (vLLM's), behind the same API keys.
- `GET /health` (200 / 503 on `core.is_serving()`), `GET /metrics` (Prometheus text of
  `core.metrics.registry`), `GET /workers` (`core.worker_statuses()`), `GET /` (dashboard).
With `core.config.api_keys` set, `/v1/*` needs `Authorization: Bearer <key>`
(gateway/auth.py; `POST /v1/requests/{id}/cancel` aborts one's own request); with
`protect_admin_endpoints`, `/metrics`, `/workers` and `/docs` need an admin key; `/health`
and the dashboard page stay open. `/docs` is off unless `docs` is set (no CDN assets). Bodies are parsed as JSON whatever the Content-Type (`curl -d` sends a
form type); a bad body is a 400 naming the field. Every chat / completions response is
counted in `core.metrics.requests` (labels `api` = chat | completions | select | responses | embeddings, `status` = the HTTP
status sent).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Optional, Sequence, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from baton.router.gateway.auth import admin_key, caller_owner, cancel_routes, client_key, docs_enabled, docs_routes
from baton.router.gateway.body_limit import BodyLimit
from baton.router.gateway.convert import PreparedRequest, check_model, prepare_chat, prepare_completion
from baton.router.metrics import labelled
from baton.router.gateway.media import request_images
from baton.router.gateway.dashboard import dashboard_html
from baton.router.gateway.errors import CLIENT_CLOSED_STATUS, ApiError, install_error_handlers
from baton.router.gateway.embeddings import embedding_routes
from baton.router.gateway.extensions import extension_routes
from baton.router.gateway.logprobs import TokenStrings
from baton.router.gateway.openapi_doc import install_openapi
from baton.router.gateway.responses_route import responses_routes
from baton.router.gateway.tool_parsers import resolve_parser
from baton.router.gateway.tools import ToolChatStream, ToolPlan, plan_tools
from baton.router.gateway.protocol import ChatCompletionRequest, CompletionRequest
from baton.router.gateway.relay import DisconnectWatcher, StreamOutcome, first_chunk, sse_body
from baton.router.gateway.responses import ChatStream, Collector, CompletionStream, ResponseContext
from baton.router.stream import StreamClosed
from baton.router.types import ChunkStream, RouterCoreAPI, RouterRequest

"""Status recorded (metrics, access log) for a request whose client went away."""

_COUNTED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/select": "select",
                  "/v1/responses": "responses", "/v1/embeddings": "embeddings"}


class RequestCounter:
    """ASGI middleware: counts chat / completions responses by API and status sent."""

    def __init__(self, app, core: RouterCoreAPI) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope, receive, send) -> None:
        api = _COUNTED_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if api is None:
            await self.app(scope, receive, send)
            return
        outcome = StreamOutcome()

        async def counting_send(message) -> None:
            outcome.see(message)
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:  # a stream that failed after its 200 counts as what failed it (relay.py)
            status, reason = outcome.result()
            labelled(self.core.metrics.requests, api, str(status or 500)).inc()
            if reason:
                labelled(self.core.metrics.stream_failures, api, reason).inc()


INLINE_PROMPT_CHARS = 1024
"""A completions prompt of token ids (without echo, which decodes them), or of text up to this many
characters, is prepared on the event loop (tens of microseconds); a longer one in a worker thread."""


def _cheap_to_prepare(body: CompletionRequest) -> bool:
    text = body.prompt_text
    return not body.echo if text is None else len(text) <= INLINE_PROMPT_CHARS


def create_app(core: RouterCoreAPI) -> FastAPI:
    """The gateway app over a `RouterCore` (see router/core.py)."""
    app = FastAPI(title="Baton", summary="OpenAI-compatible gateway of the Baton router",
                  docs_url=None, redoc_url=None, openapi_url=None)  # /docs: gateway/auth.py, no CDN
    install_error_handlers(app)
    app.add_middleware(RequestCounter, core=core)
    app.add_middleware(BodyLimit, max_bytes=core.config.max_request_bytes)
    strings = TokenStrings(core.tokenizer)
    started = int(time.time())
    keys = [Depends(client_key(core))]
    tool_parser = resolve_parser(getattr(core.config, "tool_call_parser", ""),
                                 getattr(core.tokenizer, "chat_template", None))
    admin = [Depends(admin_key(core))]
    v1 = APIRouter(prefix="/v1", dependencies=keys)

    def model_card() -> dict[str, Any]:
        return {"id": core.model_name, "object": "model", "created": started, "owned_by": "baton",
                "root": core.model_name, "max_model_len": core.max_model_len}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model, core.model_name)
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = ChatCompletionRequest.model_validate_json(await request.body())
        check_model(body.model, core.model_name)
        plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, tool_parser)
        images = await request_images(core, body.messages)  # checked here: a bad image is a 400 (media.py)
        prepared = await asyncio.to_thread(prepare_chat, body, core.tokenizer, core.max_model_len, plan)
        return await _serve(request, body, prepared, chat=True, plan=plan, images=images)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body = CompletionRequest.model_validate_json(await request.body())
        check_model(body.model, core.model_name)
        if _cheap_to_prepare(body):  # the thread hop would cost more than the work (~60 us of CPU)
            prepared = prepare_completion(body, core.tokenizer, core.max_model_len)
        else:
            prepared = await asyncio.to_thread(prepare_completion, body, core.tokenizer, core.max_model_len)
        return await _serve(request, body, prepared, chat=False)

    async def _serve(request: Request, body: Union[ChatCompletionRequest, CompletionRequest],
                     prepared: PreparedRequest, *, chat: bool, plan: Optional[ToolPlan] = None,
                     images: Sequence[tuple[bytes, str]] = ()) -> Response:
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        n = body.n or 1
        ctx = ResponseContext(
            request_id=request_id, model=core.model_name, prompt_tokens=len(prepared.prompt_token_ids),
            strings=strings, n=n, logprobs=prepared.params.HasField("logprobs"),
            include_usage=body.include_usage, continuous_usage=body.continuous_usage, echo=prepared.echo)
        stream = core.open_stream(RouterRequest(
            request_id=request_id, prompt_token_ids=prepared.prompt_token_ids, params=prepared.params,
            timeout_s=core.config.request_timeout_s, n=n, owner=caller_owner(request), images=list(images)))
        watcher = DisconnectWatcher(stream, request.receive)
        if body.stream:
            formatter = ToolChatStream(ctx, plan) if plan is not None and plan.active else ChatStream(ctx)
            return await _stream(stream, watcher, formatter if chat else CompletionStream(ctx))
        collector = Collector(ctx)
        try:
            while (chunk := await stream.next()) is not None:
                collector.add(chunk)
        except StreamClosed:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        finally:
            watcher.stop()
            stream.close()
        if chat and plan is not None and plan.active:
            return JSONResponse(plan.finish_completion(collector.chat_completion()))
        return JSONResponse(collector.chat_completion() if chat else collector.text_completion())

    async def _stream(stream: ChunkStream, watcher: DisconnectWatcher,
                      formatter: Union[ChatStream, CompletionStream]) -> Response:
        if (first := await first_chunk(stream, watcher)) is None:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        return StreamingResponse(
            sse_body(stream, first, formatter), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.include_router(v1)
    app.include_router(cancel_routes(core, keys))
    if docs_enabled(core):
        app.include_router(docs_routes(app, core, admin))
    for extra in extension_routes(core, keys):
        app.include_router(extra)
    app.include_router(responses_routes(core, keys, strings, tool_parser))
    app.include_router(embedding_routes(core, keys))

    @app.get("/health")
    async def health() -> JSONResponse:
        if core.is_serving():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": "no healthy decode worker"}, status_code=503)

    @app.get("/metrics", dependencies=admin)
    async def metrics() -> Response:
        await core.refresh_worker_loads()  # the re-exported worker counters are current at scrape time
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/workers", dependencies=admin)
    async def workers() -> JSONResponse:
        return JSONResponse(jsonable_encoder(core.worker_statuses()))

    page = dashboard_html(core.model_name)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    install_openapi(app)
    return app

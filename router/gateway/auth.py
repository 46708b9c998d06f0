"""The gateway's keys: client API keys on the OpenAI routes, admin keys on the operator routes.

Owns the FastAPI dependencies over `router/auth.py` (the one parser and checker, shared with
the gRPC service):
- `client_key(core)`: every /v1 route (and the extensions). The caller (`Caller`: key
  fingerprint, admin or not) is left in `request.state.caller`; a request records its
  caller's fingerprint as its owner (`caller_owner(request)`).
- `admin_key(core)`: the operator routes (/metrics, /workers, /docs, /openapi.json) when
  `protect_admin_endpoints` is set; open otherwise.
- `cancel_routes(core, deps)`: `POST /v1/requests/{request_id}/cancel`: aborts a running
  request of the caller's own key (an admin key may abort any); another key's request
  answers 404, exactly as an unknown one.
- `docs_routes(core, deps)`: `/openapi.json` and `/docs` when `docs` is set: a
  self-contained page listing the API from the schema; it loads nothing from elsewhere
  (FastAPI's Swagger UI fetches its scripts from a CDN, so that one stays off).
Missing or wrong keys get 401 (`missing_api_key` / `invalid_api_key`), a client key on an
admin route 403 (`admin_key_required`), in the OpenAI error shape.
"""
from __future__ import annotations

import html
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from baton.router.auth import AuthError, Caller, identify
from baton.router.gateway.errors import ApiError
from baton.router.types import RouterCoreAPI


def _raise(error: AuthError) -> None:
    status = 403 if error.reason == "admin_key_required" else 401
    raise ApiError(status, error.message, code=error.reason) from None


def client_key(core: RouterCoreAPI):
    """Dependency: a client (or admin) key when the router has keys."""
    async def require_client_key(request: Request) -> None:
        try:
            request.state.caller = identify(core.config, request.headers.get("authorization"))
        except AuthError as error:
            _raise(error)
    return require_client_key


def admin_key(core: RouterCoreAPI):
    """Dependency: an admin key on an operator route, when `protect_admin_endpoints` is set."""
    async def require_admin_key(request: Request) -> None:
        if not getattr(core.config, "protect_admin_endpoints", False):
            return
        try:
            request.state.caller = identify(core.config, request.headers.get("authorization"), admin=True)
        except AuthError as error:
            _raise(error)
    return require_admin_key


def caller_owner(request: Request) -> str:
    """The owner a request started by this HTTP caller records ("" on an open router)."""
    caller = getattr(request.state, "caller", None)
    return caller.owner if isinstance(caller, Caller) else ""


def cancel_routes(core: RouterCoreAPI, deps: list) -> APIRouter:
    """`POST /v1/requests/{request_id}/cancel` (the id is the response's `id`)."""
    router = APIRouter(prefix="/v1", dependencies=deps)

    @router.post("/requests/{request_id}/cancel")
    async def cancel(request_id: str, request: Request) -> JSONResponse:
        caller = getattr(request.state, "caller", None) or Caller(owner="", admin=False)
        if not await core.abort(request_id, caller):
            raise ApiError(404, f"No running request with id {request_id!r} belongs to this API key.",
                           code="request_not_found", param="request_id")
        return JSONResponse({"id": request_id, "object": "request.cancelled", "cancelled": True})

    return router


_DOCS = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>__TITLE__ API</title>
<style>body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d2330}code{background:#eef0f3;padding:1px 4px}
li{margin:4px 0}.m{display:inline-block;min-width:4em;font-weight:600}</style></head><body>
<h1>__TITLE__ API</h1><p>The schema: <a href="openapi.json">openapi.json</a>.</p><ul id="paths"></ul>
<script>"use strict";
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
fetch("openapi.json", {headers: sessionStorage.batonKey ? {Authorization: "Bearer " + sessionStorage.batonKey} : {}})
 .then(r => r.json()).then(spec => { document.getElementById("paths").innerHTML = Object.entries(spec.paths || {})
  .flatMap(([p, ops]) => Object.entries(ops).map(([m, op]) => "<li><span class=m>" + esc(m.toUpperCase()) +
   "</span> <code>" + esc(p) + "</code> " + esc(op.summary || "") + "</li>")).join(""); });
</script></body></html>"""


def docs_routes(app: FastAPI, core: RouterCoreAPI, deps: list) -> APIRouter:
    """`/openapi.json` and a self-contained `/docs`, behind `deps` (the admin key when protected)."""
    router = APIRouter(dependencies=deps)
    page = _DOCS.replace("__TITLE__", html.escape(app.title))

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page)

    return router


def docs_enabled(core: Any) -> bool:
    """True when the router serves /docs and /openapi.json (`--docs`)."""
    return bool(getattr(core.config, "docs", False))

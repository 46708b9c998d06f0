"""OpenAI-style errors for the HTTP gateway.

Every error the gateway returns has the OpenAI body
`{"error": {"message", "type", "param", "code"}}`, whether it comes from the gateway itself
(`ApiError`), from the router core (`BatonError`, mapped by `status_for_code`; a 429 carries
`Retry-After`), from request
validation (400, never FastAPI's 422) or from Starlette (`HTTPException`: unknown route, wrong
method). `install_error_handlers(app)` registers the handlers.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import BatonError

log = logging.getLogger(__name__)

EC = common_pb2.ErrorCode

_STATUS_BY_CODE = {
    EC.INVALID_REQUEST: 400,
    EC.UNAUTHENTICATED: 401,
    EC.OVERLOADED: 429,
    EC.NOT_READY: 503,
    EC.DRAINING: 503,
    EC.NO_WORKER: 503,
    EC.PREFILL_FAILED: 503,
    EC.TRANSFER_FAILED: 503,
    EC.DEADLINE_EXCEEDED: 504,
}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    503: "service_unavailable_error",
    504: "timeout_error",
}


CLIENT_CLOSED_STATUS = 499
"""The status counted for a request whose client went away (nginx's)."""


def status_for_code(code: int) -> int:
    """The HTTP status for a `common_pb2.ErrorCode` (500 for anything unlisted)."""
    return _STATUS_BY_CODE.get(code, 500)


def error_type_for_status(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, status: int, *, param: Optional[str] = None,
               code: Optional[str] = None, type: Optional[str] = None) -> dict[str, Any]:
    """The OpenAI error object (`{"error": {...}}`)."""
    return {"error": {
        "message": message,
        "type": type or error_type_for_status(status),
        "param": param,
        "code": code,
    }}


class ApiError(Exception):
    """An error the gateway raises itself, already in HTTP terms."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """Seconds for the Retry-After header (429 / 503); 0: none."""
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, param=self.param, code=self.code, type=self.type)


def invalid_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def router_error_to_api(error: BatonError) -> ApiError:
    """The `ApiError` for a core error: status by code, `code` = the lower-case code name;
    a refusal for load (429) says when to come back."""
    try:
        name = common_pb2.ErrorCode.Name(error.code).lower()
    except ValueError:
        name = "internal"
    status = status_for_code(error.code)
    retry_after = max(1.0, error.retry_after_s) if status == 429 else 0.0
    return ApiError(status, error.message or name, code=name, retry_after_s=retry_after,
                    param=getattr(error, "param", "") or None)


def as_api_error(exc: BaseException) -> ApiError:
    """Any exception as an `ApiError` (unexpected ones become a 500 without internals)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BatonError):
        return router_error_to_api(exc)
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return validation_error_to_api(exc.errors())
    return ApiError(500, "internal server error", code="internal")


def validation_error_to_api(errors: Any) -> ApiError:
    """A 400 naming the first invalid field (`param`) from pydantic / FastAPI error dicts."""
    errors = list(errors or [])
    if not errors:
        return invalid_request("invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = str(first.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    if first.get("type") == "json_invalid":
        return invalid_request(f"request body is not valid JSON: {message}")
    param = ".".join(loc) if loc else None
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return invalid_request(message, param=param)


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.retry_after_s > 0:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise through the OpenAI error body."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 404 and message == "Not Found":  # no route: name it (and say what is not served)
            from baton.router.gateway.refusals import unserved_error
            return error_response(unserved_error(request.method, request.url.path))
        if status == 405 and message == "Method Not Allowed":
            message = f"{request.method} {request.url.path}: method not allowed"
        if status == 422:
            status = 400
        return JSONResponse(error_body(message, status), status_code=status, headers=exc.headers)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the gateway", exc_info=exc)
        return error_response(ApiError(500, "internal server error", code="internal"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(BatonError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_api_error)
    app.add_exception_handler(ValidationError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)

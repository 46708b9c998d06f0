"""Typed errors over gRPC (shared by services and router): `BatonError`, its wire form, and the mapping to gRPC status codes.

A service refuses or fails a request by raising `BatonError(code, message)` and turning it
into a failed RPC with `await abort_with(context, error)`: the RPC fails with the mapped
gRPC status and the message, and carries the exact code name in the `baton-error-code`
trailing metadata. A caller turns any failed RPC back into a `BatonError` with
`error_from_rpc(e, default=...)`: the trailing metadata wins; without it (a dead peer, a
crash, a proxy in between) the gRPC status decides, and statuses that say nothing more
specific than "that peer failed" become the caller's `default` (e.g. PREFILL_FAILED).
"""
from __future__ import annotations

from typing import NoReturn, Optional

import grpc

from baton.protos.baton.v1 import common_pb2

ErrorCode = common_pb2.ErrorCode
"""The protobuf enum of typed error codes (`ErrorCode.OVERLOADED`, `ErrorCode.Name(code)`, ...)."""

ERROR_CODE_METADATA_KEY = "baton-error-code"
"""Trailing-metadata key carrying the error code's name (e.g. "OVERLOADED") of a failed RPC."""

STATUS_BY_CODE: dict[int, grpc.StatusCode] = {
    ErrorCode.ERROR_CODE_UNSPECIFIED: grpc.StatusCode.UNKNOWN,
    ErrorCode.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.NOT_READY: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DRAINING: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.PREFILL_FAILED: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.TRANSFER_FAILED: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.NO_WORKER: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.LAYOUT_MISMATCH: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.ABORTED: grpc.StatusCode.CANCELLED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
"""The gRPC status a failed RPC carries for each error code."""

CODE_BY_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_REQUEST,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.OVERLOADED,
    grpc.StatusCode.CANCELLED: ErrorCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
}
"""Fallback when a failed RPC has no `baton-error-code`: statuses with one clear meaning.
Every other status (UNAVAILABLE from a dead peer, UNKNOWN from a crash, INTERNAL, ...) maps
to the caller's default code."""


class BatonError(Exception):
    """A typed failure: an `ErrorCode` value plus a human-readable message."""

    def __init__(self, code: int, message: str = "") -> None:
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown baton error code {code!r}")
        super().__init__(message)
        self.code = int(code)
        self.message = message

    @property
    def code_name(self) -> str:
        """The code's enum name, e.g. "OVERLOADED"."""
        return ErrorCode.Name(self.code)

    @property
    def status_code(self) -> grpc.StatusCode:
        """The gRPC status this error is sent with."""
        return STATUS_BY_CODE[self.code]

    @property
    def retryable(self) -> bool:
        """True when another worker (or a later attempt) may succeed (status UNAVAILABLE or
        RESOURCE_EXHAUSTED)."""
        return self.status_code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def to_proto(self) -> common_pb2.Error:
        """The `baton.v1.Error` message for this error."""
        return common_pb2.Error(code=self.code, message=self.message)

    @classmethod
    def from_proto(cls, msg: common_pb2.Error) -> "BatonError":
        """The error a `baton.v1.Error` message describes."""
        return cls(msg.code, msg.message)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}" if self.message else self.code_name

    def __repr__(self) -> str:
        return f"BatonError({self.code_name}, {self.message!r})"


async def abort_with(context: grpc.aio.ServicerContext, error: BatonError) -> NoReturn:
    """Fail the current RPC with `error`: its mapped status, its message, and the
    `baton-error-code` trailing metadata. Never returns (raises grpc's abort exception)."""
    await context.abort(error.status_code, error.message,
                        trailing_metadata=((ERROR_CODE_METADATA_KEY, error.code_name),))
    raise AssertionError("context.abort returned")  # pragma: no cover


def _metadata_code(e: grpc.RpcError) -> Optional[int]:
    trailing = getattr(e, "trailing_metadata", None)
    try:
        items = trailing() if callable(trailing) else None
    except Exception:  # a call that never started has no metadata
        items = None
    for key, value in items or ():
        if key == ERROR_CODE_METADATA_KEY:
            name = value.decode() if isinstance(value, bytes) else str(value)
            try:
                return ErrorCode.Value(name)
            except ValueError:
                return None
    return None


def error_from_rpc(e: grpc.RpcError, default: int = ErrorCode.INTERNAL) -> BatonError:
    """The `BatonError` a failed RPC (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) stands
    for: the code from `baton-error-code` when present, else from the status (see
    `CODE_BY_STATUS`), else `default`. The message is the RPC's details."""
    code_fn = getattr(e, "code", None)
    status = code_fn() if callable(code_fn) else None
    details_fn = getattr(e, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    code = _metadata_code(e)
    if code is None:
        code = CODE_BY_STATUS.get(status, default) if status is not None else default
        if status is not None and status not in CODE_BY_STATUS:
            details = f"{status.name}: {details}" if details else status.name
    if not details:
        details = status.name if status is not None else type(e).__name__
    return BatonError(code, details)

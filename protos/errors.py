"""Typed errors over gRPC (shared by services and router): `BatonError`, its wire form, and the mapping to gRPC status codes.

`BatonError` is the one error type of the project: workers raise it, the router raises it to
its callers, the gateway maps it to an HTTP status. Besides its code it says where the fault
lies, in typed fields that travel as trailing metadata: `unreachable` (the failing peer
could not be reached or died: no answer from it, as opposed to an answer that refused) and
`origin` (the worker that answered, or the prefill worker it called on the request's behalf).

A service refuses or fails a request by raising `BatonError(code, message)` and turning it
into a failed RPC with `await abort_with(context, error)`: the RPC fails with the mapped
gRPC status and the message, and carries the exact code name in the `baton-error-code`
trailing metadata. A caller turns any failed RPC back into a `BatonError` with
`error_from_rpc(e, default=...)`: the trailing metadata wins; without it (a dead peer, a
crash, a proxy in between) the gRPC status decides, and statuses that say nothing more
specific than "that peer failed" become the caller's `default` (e.g. PREFILL_FAILED).
"""
from __future__ import annotations

import enum
from typing import NoReturn, Optional

import grpc

from baton.protos.baton.v1 import common_pb2

ErrorCode = common_pb2.ErrorCode
"""The protobuf enum of typed error codes (`ErrorCode.OVERLOADED`, `ErrorCode.Name(code)`, ...)."""

ERROR_CODE_METADATA_KEY = "baton-error-code"
"""Trailing-metadata key carrying the error code's name (e.g. "OVERLOADED") of a failed RPC."""
UNREACHABLE_METADATA_KEY = "baton-error-unreachable"
"""Trailing-metadata key, present ("1") when the failing peer could not be reached."""
ORIGIN_METADATA_KEY = "baton-error-origin"
"""Trailing-metadata key carrying the `ErrorOrigin` value of a failed RPC."""
RETRY_AFTER_METADATA_KEY = "baton-retry-after-s"
"""Trailing-metadata key: seconds after which an OVERLOADED request may be tried again."""
PARAM_METADATA_KEY = "baton-error-param"
"""Trailing-metadata key: the request field an INVALID_REQUEST is about (OpenAI's `param`)."""


class ErrorOrigin(enum.Enum):
    """Which worker a failure belongs to, seen from the one that reports it."""

    WORKER = "worker"
    """The worker that answered the call (or failed to)."""
    PREFILL = "prefill"
    """The prefill worker that a decode worker called for the request."""
    ENCODER = "encoder"
    """The encoders a worker asked for the request's image embeddings (none could deliver them)."""

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
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
}
"""Fallback when a failed RPC has no `baton-error-code`: statuses with one clear meaning.
Every other status (UNAVAILABLE from a dead peer, UNKNOWN from a crash, INTERNAL, ...) maps
to the caller's default code. A bare CANCELLED is one of those: a peer that aborts a request
on purpose says ABORTED in its metadata, while a server that stops (or a process that dies
mid-call) cancels its calls without it, so that status means the peer went away."""


class BatonError(Exception):
    """A typed failure: an `ErrorCode` value, a human-readable message, and where it lies.

    `unreachable`: the peer that failed gave no answer (dead process, refused connection).
    `origin`: whose failure it is (`ErrorOrigin.PREFILL` when a decode worker reports its
    prefill worker's failure). `retry_after_s`: for OVERLOADED, when to try again (0: unknown).
    """

    def __init__(self, code: int, message: str = "", *, unreachable: bool = False,
                 origin: ErrorOrigin = ErrorOrigin.WORKER, retry_after_s: float = 0.0, param: str = "") -> None:
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown baton error code {code!r}")
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.unreachable = unreachable
        self.origin = origin
        self.retry_after_s = retry_after_s
        self.param = param
        """The request field at fault (OpenAI's error `param`, e.g. "response_format"); "" when none."""

    def with_origin(self, origin: ErrorOrigin) -> "BatonError":
        """The same error attributed to `origin` (a decode worker relaying its prefill's failure)."""
        return BatonError(self.code, self.message, unreachable=self.unreachable, origin=origin,
                          retry_after_s=self.retry_after_s, param=self.param)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The trailing metadata that carries this error's typed fields."""
        items = [(ERROR_CODE_METADATA_KEY, self.code_name), (ORIGIN_METADATA_KEY, self.origin.value)]
        if self.unreachable:
            items.append((UNREACHABLE_METADATA_KEY, "1"))
        if self.retry_after_s > 0:
            items.append((RETRY_AFTER_METADATA_KEY, f"{self.retry_after_s:g}"))
        if self.param:
            items.append((PARAM_METADATA_KEY, self.param))
        return tuple(items)

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
    await context.abort(error.status_code, error.message, trailing_metadata=error.metadata())
    raise AssertionError("context.abort returned")  # pragma: no cover


def _trailing(e: grpc.RpcError) -> dict[str, str]:
    trailing = getattr(e, "trailing_metadata", None)
    try:
        items = trailing() if callable(trailing) else None
    except Exception:  # a call that never started has no metadata
        items = None
    return {key: value.decode() if isinstance(value, bytes) else str(value) for key, value in items or ()}


def _code_named(name: Optional[str]) -> Optional[int]:
    if name is None:
        return None
    try:
        return ErrorCode.Value(name)
    except ValueError:
        return None


def error_from_rpc(e: grpc.RpcError, default: int = ErrorCode.INTERNAL) -> BatonError:
    """The `BatonError` a failed RPC (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) stands
    for: the code and typed fields from the trailing metadata when present, else the code
    from the status (see `CODE_BY_STATUS`), else `default`. Without Baton metadata, status
    UNAVAILABLE (or a bare CANCELLED: a server that stopped) means the peer gave no answer:
    `unreachable` is set. The message is the RPC's
    details."""
    code_fn = getattr(e, "code", None)
    status = code_fn() if callable(code_fn) else None
    details_fn = getattr(e, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    metadata = _trailing(e)
    code = _code_named(metadata.get(ERROR_CODE_METADATA_KEY))
    if code is None:
        unreachable = status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        origin, retry_after = ErrorOrigin.WORKER, 0.0
        code = CODE_BY_STATUS.get(status, default) if status is not None else default
        if status is not None and status not in CODE_BY_STATUS:
            details = f"{status.name}: {details}" if details else status.name
    else:
        unreachable = metadata.get(UNREACHABLE_METADATA_KEY) == "1"
        try:
            origin = ErrorOrigin(metadata.get(ORIGIN_METADATA_KEY, ErrorOrigin.WORKER.value))
        except ValueError:
            origin = ErrorOrigin.WORKER
        try:
            retry_after = float(metadata.get(RETRY_AFTER_METADATA_KEY, 0.0))
        except ValueError:
            retry_after = 0.0
    if not details:
        details = status.name if status is not None else type(e).__name__
    return BatonError(code, details, unreachable=unreachable, origin=origin, retry_after_s=retry_after,
                      param=metadata.get(PARAM_METADATA_KEY, ""))

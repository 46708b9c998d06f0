"""BatonError <-> gRPC status + `baton-error-code` trailing metadata."""
from __future__ import annotations

import grpc
import pytest

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import (CODE_BY_STATUS, STATUS_BY_CODE, BatonError, ErrorCode, error_from_rpc)


class FakeRpcError(grpc.RpcError):
    """A failed call as a sync client sees it."""

    def __init__(self, status: grpc.StatusCode, details: str = "", metadata=()) -> None:
        self._status, self._details, self._metadata = status, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._metadata


def test_every_code_has_a_status() -> None:
    assert set(STATUS_BY_CODE) == set(ErrorCode.values())
    assert STATUS_BY_CODE[ErrorCode.INVALID_REQUEST] == grpc.StatusCode.INVALID_ARGUMENT
    assert STATUS_BY_CODE[ErrorCode.OVERLOADED] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for code in ("NOT_READY", "DRAINING", "PREFILL_FAILED", "TRANSFER_FAILED", "NO_WORKER"):
        assert STATUS_BY_CODE[ErrorCode.Value(code)] == grpc.StatusCode.UNAVAILABLE
    assert STATUS_BY_CODE[ErrorCode.LAYOUT_MISMATCH] == grpc.StatusCode.FAILED_PRECONDITION
    assert STATUS_BY_CODE[ErrorCode.ABORTED] == grpc.StatusCode.CANCELLED
    assert STATUS_BY_CODE[ErrorCode.DEADLINE_EXCEEDED] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert STATUS_BY_CODE[ErrorCode.UNAUTHENTICATED] == grpc.StatusCode.UNAUTHENTICATED
    assert STATUS_BY_CODE[ErrorCode.INTERNAL] == grpc.StatusCode.INTERNAL


def test_error_basics() -> None:
    e = BatonError(ErrorCode.OVERLOADED, "queue full")
    assert e.code == ErrorCode.OVERLOADED and e.message == "queue full" and e.code_name == "OVERLOADED"
    assert str(e) == "OVERLOADED: queue full" and e.retryable
    assert not BatonError(ErrorCode.INVALID_REQUEST, "x").retryable
    assert BatonError.from_proto(e.to_proto()).code == e.code
    assert e.to_proto() == common_pb2.Error(code=ErrorCode.OVERLOADED, message="queue full")
    with pytest.raises(ValueError):
        BatonError(999, "nope")


@pytest.mark.parametrize("code", [c for c in ErrorCode.values() if c != ErrorCode.ERROR_CODE_UNSPECIFIED])
def test_metadata_code_wins(code: int) -> None:
    e = FakeRpcError(STATUS_BY_CODE[code], "why", (("other", "x"), ("baton-error-code", ErrorCode.Name(code))))
    back = error_from_rpc(e, default=ErrorCode.PREFILL_FAILED)
    assert back.code == code and back.message == "why"


def test_status_fallback_and_default() -> None:
    dead_peer = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    back = error_from_rpc(dead_peer, default=ErrorCode.PREFILL_FAILED)
    assert back.code == ErrorCode.PREFILL_FAILED and "failed to connect" in back.message
    assert error_from_rpc(dead_peer).code == ErrorCode.INTERNAL
    assert error_from_rpc(FakeRpcError(grpc.StatusCode.UNKNOWN), ErrorCode.TRANSFER_FAILED).code == \
        ErrorCode.TRANSFER_FAILED
    for status, code in CODE_BY_STATUS.items():
        assert error_from_rpc(FakeRpcError(status, "d"), default=ErrorCode.NO_WORKER).code == code
    unknown_name = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "", (("baton-error-code", "NEW_CODE"),))
    assert error_from_rpc(unknown_name).code == ErrorCode.OVERLOADED
    assert error_from_rpc(FakeRpcError(grpc.StatusCode.INTERNAL, "", None)).message.startswith("INTERNAL")


def test_typed_fields_travel_in_metadata() -> None:
    from baton.protos.errors import ErrorOrigin
    sent = BatonError(ErrorCode.PREFILL_FAILED, "prefill gone", unreachable=True).with_origin(ErrorOrigin.PREFILL)
    back = error_from_rpc(FakeRpcError(sent.status_code, "prefill gone", sent.metadata()))
    assert (back.code, back.unreachable, back.origin) == (ErrorCode.PREFILL_FAILED, True, ErrorOrigin.PREFILL)
    busy = BatonError(ErrorCode.OVERLOADED, "full", retry_after_s=0.5)
    back = error_from_rpc(FakeRpcError(busy.status_code, "full", busy.metadata()))
    assert (back.unreachable, back.origin, back.retry_after_s) == (False, ErrorOrigin.WORKER, 0.5)


def test_unavailable_without_metadata_is_unreachable() -> None:
    dead = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert dead.unreachable and dead.code == ErrorCode.INTERNAL
    refused = BatonError(ErrorCode.NOT_READY, "loading")
    back = error_from_rpc(FakeRpcError(refused.status_code, "loading", refused.metadata()))
    assert back.code == ErrorCode.NOT_READY and not back.unreachable
    assert not error_from_rpc(FakeRpcError(grpc.StatusCode.INTERNAL, "boom")).unreachable


def test_a_bare_cancelled_is_a_peer_that_went_away_not_a_client_abort() -> None:
    stopped = error_from_rpc(FakeRpcError(grpc.StatusCode.CANCELLED, "server shutting down"), ErrorCode.PREFILL_FAILED)
    assert stopped.code == ErrorCode.PREFILL_FAILED and stopped.unreachable
    aborted = BatonError(ErrorCode.ABORTED, "the client aborted")
    back = error_from_rpc(FakeRpcError(aborted.status_code, "the client aborted", aborted.metadata()))
    assert back.code == ErrorCode.ABORTED and not back.unreachable

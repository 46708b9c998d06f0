"""OpenAI error bodies and the BatonError code -> HTTP status mapping."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from baton.protos.baton.v1 import common_pb2
from baton.router.gateway.errors import (ApiError, as_api_error, error_body, status_for_code,
                                   validation_error_to_api)
from baton.router.gateway.protocol import ChatCompletionRequest
from baton.protos.errors import BatonError

EC = common_pb2.ErrorCode


@pytest.mark.parametrize("code, status", [
    (EC.INVALID_REQUEST, 400), (EC.UNAUTHENTICATED, 401), (EC.OVERLOADED, 429), (EC.NOT_READY, 503),
    (EC.DRAINING, 503), (EC.NO_WORKER, 503), (EC.PREFILL_FAILED, 503), (EC.TRANSFER_FAILED, 503),
    (EC.DEADLINE_EXCEEDED, 504), (EC.INTERNAL, 500), (EC.ABORTED, 500), (EC.LAYOUT_MISMATCH, 500),
    (EC.ERROR_CODE_UNSPECIFIED, 500), (999, 500),
])
def test_status_for_code(code: int, status: int) -> None:
    assert status_for_code(code) == status


def test_error_body_shape() -> None:
    body = error_body("bad", 400, param="temperature", code="x")
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "temperature", "code": "x"}}
    assert error_body("down", 503)["error"]["type"] == "service_unavailable_error"
    assert error_body("boom", 500)["error"]["type"] == "server_error"


def test_router_error_becomes_api_error() -> None:
    error = as_api_error(BatonError(EC.OVERLOADED, "queues full"))
    assert (error.status, error.code, error.message) == (429, "overloaded", "queues full")
    assert error.body()["error"]["type"] == "rate_limit_error"
    assert as_api_error(BatonError(EC.DEADLINE_EXCEEDED, "late")).status == 504
    unexpected = as_api_error(KeyError("secret internals"))
    assert unexpected.status == 500 and "secret" not in unexpected.message
    same = ApiError(404, "nope")
    assert as_api_error(same) is same


def test_validation_errors_become_400_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "temperature": 3})
    error = validation_error_to_api(info.value.errors())
    assert error.status == 400 and error.param == "temperature"
    assert error.message.startswith("temperature: ")
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(b"{not json")
    assert "not valid JSON" in as_api_error(info.value).message
    with pytest.raises(ValidationError) as info:  # a model-level check: no "Value error, " prefix
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    error = as_api_error(info.value)
    assert error.param is None and error.message == "top_logprobs requires logprobs to be true"

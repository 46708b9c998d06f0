"""Clear refusals (router/gateway/refusals.py, errors.py): OpenAI endpoints Baton does not serve
are 501s naming them, unknown paths 404s naming the path, a wrong method a 405: all in the
OpenAI error format, never FastAPI's bare `{"detail": "Not Found"}`. And the OpenAPI document
(openapi_doc.py) has every body and no 422."""
from __future__ import annotations

import pytest

from baton.router.gateway.app import create_app
from tests.unit.router.gateway.test_app import call


@pytest.mark.parametrize("method, path, status, words", [
    ("POST", "/v1/audio/speech", 501, "audio (speech, transcriptions, translations) is not supported"),
    ("POST", "/v1/images/generations", 501, "image generation is not supported"),
    ("GET", "/v1/files", 501, "files is not supported"),
    ("GET", "/v1/responses/resp_1", 501, "stored responses are not supported"),
    ("DELETE", "/v1/responses/resp_1", 501, "stored responses are not supported"),
    ("GET", "/v1/chat/completions/chatcmpl-1", 501, "stored chat completions are not supported"),
    ("POST", "/v1/nonsense", 404, "POST /v1/nonsense: no such endpoint"),
    ("GET", "/nonsense", 404, "GET /nonsense: no such endpoint"),
    ("GET", "/v1/chat/completions", 405, "method not allowed"),
    ("GET", "/v1/embeddings", 405, "method not allowed"),
])
def test_unserved_endpoints_are_named(fake_core, method, path, status, words):
    response = call(fake_core, method, path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and "detail" not in response.json()
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_openapi_document_has_bodies_and_no_422(fake_core):
    doc = create_app(fake_core).openapi()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"):
        op = doc["paths"][path]["post"]
        assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"]
        assert "text/event-stream" in op["responses"]["200"]["content"] or path == "/v1/embeddings"
        assert "422" not in op["responses"] and {"400", "401", "413", "429", "503"} <= set(op["responses"])


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
])
def test_unserved_chat_parameters_are_named(fake_core, field, value):
    body = {"messages": [{"role": "user", "content": "Hi"}], field: value}
    response = call(fake_core, "POST", "/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text

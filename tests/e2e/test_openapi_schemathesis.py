"""The gateway's OpenAPI document on a live cluster (the tool router in front of the session's
`baton up` workers): it describes every request and response body and only status codes the
gateway sends (no 422), and schemathesis, generating bounded bodies from it for every operation,
finds no 5xx and no answer that breaks the document (status code, content type, body schema).
Generation budgets are capped before each call (a few tokens, few choices) to keep it short."""
import json
import time
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def openapi_doc(tool_router):
    with urllib.request.urlopen(tool_router + "/openapi.json") as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def api_schema(tool_router):
    return schemathesis.openapi.from_url(tool_router + "/openapi.json")


def test_document_describes_bodies_and_real_status_codes(openapi_doc):
    paths = openapi_doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"):
        op = paths[path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components/schemas/")
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(op["responses"])
    schemas = openapi_doc["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "EmbeddingRequest", "ChatCompletion",
            "TextCompletion", "ResponseObject", "EmbeddingResponse", "ErrorResponse"} <= set(schemas)
    assert "tools" in schemas["ChatCompletionRequest"]["properties"]
    assert '"422"' not in json.dumps(openapi_doc) and "HTTPValidationError" not in schemas


BUDGET = {"/v1/chat/completions": "max_completion_tokens", "/v1/completions": "max_tokens",
          "/v1/responses": "max_output_tokens"}
"""The generation budget each route reads (absent, a request may generate up to the whole context)."""


def bounded(case) -> None:
    """Small generation budgets and the served model's name (another name is a 404 by design)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body:
        body["model"] = MODEL
    key = BUDGET.get(case.operation.path)
    if key is not None:
        body[key] = 0 if key == "max_tokens" and body.get(key) == 0 else 2
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], 2)
    if isinstance(body.get("input"), list):
        body["input"] = body["input"][:4]


def test_fuzzed_requests_get_documented_answers(api_schema):
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:
        @given(operation.as_strategy())
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            bounded(case)
            case.call_and_validate(checks=checks, timeout=60)

        started = time.monotonic()
        run()
        print(f"{operation.method.upper()} {operation.path}: {time.monotonic() - started:.1f} s")

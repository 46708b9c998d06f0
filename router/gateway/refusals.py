"""Clear refusals for the OpenAI API Baton does not serve.

A path no route serves answers in the OpenAI error format (errors.py's handler asks
`unserved_error`), never FastAPI's bare `{"detail": "Not Found"}`: an endpoint of OpenAI's
API that Baton does not serve (audio, images, files, batches, fine-tuning, moderations,
assistants and threads, vector stores, realtime, uploads, containers, evals; stored responses
and conversations) is a 501 naming it, and any other path a 404 naming it. A wrong method on a served route is Starlette's 405, in the
OpenAI format too (errors.py).
"""
from __future__ import annotations

from baton.router.gateway.errors import ApiError

UNSERVED = {
    "audio": "audio (speech, transcriptions, translations)",
    "images": "image generation",
    "files": "files",
    "uploads": "uploads",
    "batches": "batches",
    "fine_tuning": "fine-tuning",
    "fine-tunes": "fine-tuning",
    "moderations": "moderations",
    "assistants": "assistants",
    "threads": "threads and runs",
    "vector_stores": "vector stores",
    "realtime": "the realtime API",
    "containers": "containers",
    "evals": "evals",
    "conversations": "stored conversations",
    "chatkit": "ChatKit",
    "videos": "video generation",
}
"""First path segment under /v1 -> what OpenAI serves there and Baton does not."""

def _unsupported(message: str) -> ApiError:
    return ApiError(501, message, code="unsupported_endpoint", type="invalid_request_error")


def unserved_error(method: str, path: str) -> ApiError:
    """The error for a path no route serves: 501 naming an OpenAI endpoint Baton does not
    serve, else 404 naming the path."""
    where = f"{method} {path}"
    if path.startswith("/v1/"):
        rest = path[len("/v1/"):].strip("/")
        head = rest.split("/", 1)[0]
        if head == "responses" and rest != "responses":
            return _unsupported(f"{where}: stored responses are not supported (this server stores none; "
                                "responses are stateless)")
        if rest.startswith("chat/completions/"):
            return _unsupported(f"{where}: stored chat completions are not supported")
        if head in UNSERVED:
            return _unsupported(f"{where}: {UNSERVED[head]} is not supported by this server")
    return ApiError(404, f"{where}: no such endpoint", code="unknown_url")

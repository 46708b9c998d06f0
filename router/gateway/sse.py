"""Server-sent event framing of the gateway's streamed responses.

- `compact_json(obj)`: the JSON text `json.dumps(obj, ensure_ascii=False, separators=(",", ":"))`
  gives (non-ASCII kept, no spaces), from one encoder built once instead of one per call.
- `json_str(text)`: one JSON string literal, as that encoder writes it (the templates of the
  common streamed chunk in responses.py splice it in, so their bytes equal the encoder's).
- `sse(obj)`: one `data: {json}` event as UTF-8 bytes; `SSE_DONE`: the event that ends a stream.
"""
from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import Any

compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""`json.dumps(obj, ensure_ascii=False, separators=(",", ":"))` without building an encoder per call."""

json_str = encode_basestring
"""A JSON string literal of `text`, quotes included: what `compact_json` writes for a str (the
encoder with ensure_ascii=False uses this very function)."""

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON object."""
    return f"data: {compact_json(obj)}\n\n".encode()

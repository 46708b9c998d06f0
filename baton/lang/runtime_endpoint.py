"""`RuntimeEndpoint`: the program backend over a Baton gateway's HTTP API.

The calls it makes (docs/lang.md lists them with their bodies):
- text prompts: `POST /v1/completions` (`regex` and `response_format` carry constraints);
- chat prompts: `POST /v1/chat/completions`, the server rendering the messages with the
  model's chat template; an open assistant reply is continued with `continue_final_message`
  (vLLM's extension), else the reply starts after the generation prompt;
- `select`: `POST /v1/select` (Baton's extension: prompt-logprob scoring on the server);
- `cache_prefix`: a one-token completion of the prompt (the server keeps its prefix cached);
- `render`: `POST /tokenize` (messages through the template) then `POST /detokenize`.
Every call has a deadline (`timeout_s`); an error status becomes a `BackendError` carrying the
server's message. One `httpx.Client` (thread-safe, pooled) serves every thread of a batch.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import httpx

from baton.lang.backend import Completion, GenerateCall, Prompt, Selection
from baton.lang.errors import BackendError


class RuntimeEndpoint:
    """A Baton gateway (`baton up`, the router's HTTP port, or anything that speaks its API)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout_s: float = 300.0,
                 max_connections: int = 256) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s,
                                    limits=httpx.Limits(max_connections=max_connections,
                                                        max_keepalive_connections=max_connections))
        self.model = self._request("GET", "/v1/models")["data"][0]["id"]
        """The served model's name (asked at construction, which checks the gateway is there)."""

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.base_url!r}, model={self.model!r})"

    # --- the backend calls -----------------------------------------------------------
    def generate(self, call: GenerateCall) -> Completion:
        s = call.sampling
        body: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                                "top_k": s.top_k, "min_p": s.min_p, "frequency_penalty": s.frequency_penalty,
                                "presence_penalty": s.presence_penalty}
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        if call.regex is not None:
            body["regex"] = call.regex
        if call.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": json.loads(call.json_schema)}}
        if call.prompt.text is not None:
            reply = self._request("POST", "/v1/completions", {"prompt": call.prompt.text, **body})
            text = reply["choices"][0]["text"]
        else:
            reply = self._request("POST", "/v1/chat/completions", {**_chat_fields(call.prompt), **body})
            text = reply["choices"][0]["message"]["content"] or ""
        usage = reply.get("usage") or {}
        return Completion(text=text, finish_reason=reply["choices"][0].get("finish_reason"),
                          prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", 0),
                          cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))

    def select(self, prompt: Prompt, choices: Sequence[str]) -> Selection:
        body: dict[str, Any] = {"choices": list(choices)}
        if prompt.text is not None:
            body["prompt"] = prompt.text
        else:
            body.update(messages=list(prompt.messages), continue_final_message=prompt.open_reply)
        reply = self._request("POST", "/v1/select", body)
        usage = reply.get("usage") or {}
        return Selection(index=reply["selected"], choices=list(choices),
                         scores=[c["score"] for c in reply["choices"]],
                         prompt_tokens=usage.get("prompt_tokens", 0),
                         cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                         details=reply["choices"])

    def cache_prefix(self, prompt: Prompt) -> None:
        if prompt.is_empty:
            return
        body = {"max_tokens": 1, "temperature": 0.0}
        if prompt.text is not None:
            self._request("POST", "/v1/completions", {"prompt": prompt.text, **body})
        else:
            self._request("POST", "/v1/chat/completions", {**_chat_fields(prompt, closed=True), **body})

    def render(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tokens = self._request("POST", "/tokenize", _chat_fields(prompt, closed=True))["tokens"]
        return self._request("POST", "/detokenize", {"tokens": tokens})["prompt"]

    # --- HTTP ------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.TimeoutException as error:
            raise BackendError(f"{method} {self.base_url}{path} timed out: {error}") from None
        except httpx.HTTPError as error:
            raise BackendError(f"cannot reach the Baton gateway at {self.base_url}: {error}") from None
        if response.status_code != 200:
            raise _error_from(response, f"{method} {path}")
        return response.json()


def _chat_fields(prompt: Prompt, closed: bool = False) -> dict[str, Any]:
    """Messages and how to end them: continue an open reply; else open one (or, `closed`, not)."""
    fields: dict[str, Any] = {"messages": list(prompt.messages)}
    if prompt.open_reply:
        fields.update(continue_final_message=True, add_generation_prompt=False)
    elif closed:
        fields["add_generation_prompt"] = False
    return fields


def _error_from(response: httpx.Response, what: str) -> BackendError:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    message = error.get("message") or response.text[:500] or response.reason_phrase
    return BackendError(f"{what}: HTTP {response.status_code}: {message}", status=response.status_code,
                        code=error.get("code"), param=error.get("param"))

"""The benchmark's HTTP side: one `openai.AsyncOpenAI` client (one connection pool, reused
by every request) that streams chat / completions requests and records their timelines,
plus the plain GETs the benchmark needs (/v1/models, /metrics, /workers) on the same pool.

Every request streams with `stream_options.include_usage`, so prompt, output and cached
token counts come from the server's usage when it sends one; otherwise the prompt count
is the workload's estimate and the output count the number of non-empty chunks. A
request never raises: failures become a `RequestRecord` with `error_kind` set (`http_<status>`,
`connection_error`, `timeout`, `stream_error`, `empty_output` or the exception's class name).
"""
from __future__ import annotations

import importlib
import time
from typing import Any, Optional

import openai

from baton.bench.serving.datasets import messages_to_text
from baton.bench.serving.metrics import RequestRecord


def _http_module() -> Any:
    """The httpx-compatible module the installed `openai` is built on (httpx, or httpx2 in openai 3)."""
    base = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return importlib.import_module(base.__module__.split(".")[0])


def server_root(base_url: str) -> str:
    """`http://host:port` from `http://host:port`, `.../` or `.../v1`."""
    root = base_url.rstrip("/")
    return root[:-3].rstrip("/") if root.endswith("/v1") else root


class BenchClient:
    """The one OpenAI client of a benchmark; `async with` closes its connections."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float, max_connections: Optional[int] = None,
                 endpoint: str = "chat", ignore_eos: bool = True, temperature: float = 0.0) -> None:
        http = _http_module()
        self.root = server_root(base_url)
        self.endpoint = endpoint
        self.ignore_eos = ignore_eos
        self.temperature = temperature
        limits = http.Limits(max_connections=max_connections, max_keepalive_connections=max_connections or 1024)
        self.http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=http.Timeout(timeout_s, connect=10.0))
        self.openai = openai.AsyncOpenAI(base_url=self.root + "/v1", api_key=api_key or "none", max_retries=0,
                                         timeout=timeout_s, http_client=self.http)
        self._perf0 = time.perf_counter()

    async def __aenter__(self) -> "BenchClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.openai.close()

    def set_clock(self, perf_zero: float) -> None:
        """Record times relative to this `time.perf_counter()` value (the run's start)."""
        self._perf0 = perf_zero

    def now(self) -> float:
        return time.perf_counter() - self._perf0

    # --- plain GETs ------------------------------------------------------------------
    async def get_text(self, path: str, timeout_s: float = 10.0) -> Optional[str]:
        """GET root + path; the body on a 200, else None (never raises)."""
        try:
            reply = await self.http.get(self.root + path, timeout=timeout_s)
        except Exception:  # noqa: BLE001 - unreachable / refused / timeout all mean "not available"
            return None
        return reply.text if reply.status_code == 200 else None

    async def first_model(self) -> Optional[str]:
        """The first id /v1/models lists, or None."""
        try:
            page = await self.openai.models.list()
        except Exception:  # noqa: BLE001
            return None
        return page.data[0].id if page.data else None

    # --- one streamed request ----------------------------------------------------------
    async def send(self, model: str, messages: list[dict[str, str]], max_tokens: int, est_prompt_tokens: int,
                   session: int = 0, turn: int = 0) -> RequestRecord:
        rec = RequestRecord(session=session, turn=turn, max_tokens=max_tokens, prompt_tokens=est_prompt_tokens)
        extra = {"ignore_eos": True} if self.ignore_eos else None
        common = dict(model=model, max_tokens=max_tokens, temperature=self.temperature, stream=True,
                      stream_options={"include_usage": True}, extra_body=extra)
        pieces: list[str] = []
        rec.start = self.now()
        try:
            if self.endpoint == "chat":
                stream = await self.openai.chat.completions.create(messages=messages, **common)
            else:
                stream = await self.openai.completions.create(prompt=messages_to_text(messages), **common)
            async for chunk in stream:
                now = self.now()
                if chunk.usage is not None:
                    _take_usage(rec, chunk.usage)
                text = _chunk_text(chunk, self.endpoint)
                if text:
                    rec.chunk_times.append(now)
                    pieces.append(text)
            rec.end = self.now()
            rec.text = "".join(pieces)
            if not rec.output_tokens_from_usage:
                rec.output_tokens = len(rec.chunk_times)
            rec.success = bool(rec.chunk_times)
            if not rec.success:
                rec.error_kind, rec.error = "empty_output", "the stream ended without any text"
        except Exception as error:  # noqa: BLE001 - every failure is recorded, none escapes
            rec.end = self.now()
            rec.text = "".join(pieces)
            rec.success = False
            rec.error_kind, rec.error = classify_error(error)
        return rec


def _chunk_text(chunk: Any, endpoint: str) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    if endpoint == "chat":
        return (choice.delta.content or "") if choice.delta is not None else ""
    return choice.text or ""


def _take_usage(rec: RequestRecord, usage: Any) -> None:
    if usage.prompt_tokens:
        rec.prompt_tokens, rec.prompt_tokens_from_usage = int(usage.prompt_tokens), True
    if usage.completion_tokens is not None:
        rec.output_tokens, rec.output_tokens_from_usage = int(usage.completion_tokens), True
    details = getattr(usage, "prompt_tokens_details", None)
    if details is not None and getattr(details, "cached_tokens", None) is not None:
        rec.cached_tokens = int(details.cached_tokens)


def classify_error(error: BaseException) -> tuple[str, str]:
    """(kind, message) of a failed request."""
    if isinstance(error, openai.APIStatusError):
        return f"http_{error.status_code}", _api_message(error)
    if isinstance(error, openai.APITimeoutError):
        return "timeout", str(error) or "request timed out"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        return "connection_error", f"{error}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    if isinstance(error, openai.APIError):
        return "stream_error", _api_message(error)
    return type(error).__name__, str(error) or type(error).__name__


def _api_message(error: openai.APIError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return error.message or str(error)

"""The benchmark's HTTP side: one `openai.AsyncOpenAI` client (one connection pool, reused
by every request) that streams chat / completions requests and records their timelines,
plus the plain GETs the benchmark needs (/v1/models, /metrics, /workers) on the same pool.

Every request streams with `stream_options.include_usage` (and `continuous_usage_stats`,
unless turned off), so prompt, output and cached token counts come from the server's usage
when it sends one, and each chunk's running completion-token total when the server sends
usage with every chunk; otherwise the prompt count is the workload's and the output count
is left to the runner (tokenizer or number of chunks). The connection pool's sockets are
wrapped (`_CountingBackend`) so each chunk is stamped with the network read that brought it
and that read's time; where the pool cannot be wrapped, reads stay unknown. A request
never raises: failures become a `RequestRecord` with `error_kind` set (`http_<status>`,
`connection_error`, `timeout`, `stream_error`, `empty_output` or the exception's class name).
"""
from __future__ import annotations

import contextvars
import importlib
import time
from typing import Any, Optional

import openai

from baton.bench.serving.datasets import messages_to_text
from baton.bench.serving.metrics import RequestRecord, usage_chunk_tokens


class ReadLog:
    """The socket reads of the request the current task streams: how many, and the last one's time."""

    __slots__ = ("count", "time")

    def __init__(self) -> None:
        self.count, self.time = 0, 0.0


_READS: contextvars.ContextVar[Optional[ReadLog]] = contextvars.ContextVar("baton_bench_reads", default=None)


class _CountingStream:
    """A network stream that notes each non-empty read in the current task's ReadLog."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        log = _READS.get()
        if log is not None and data:
            log.count += 1
            log.time = time.perf_counter()
        return data

    async def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, *args: Any, **kwargs: Any) -> "_CountingStream":
        return _CountingStream(await self._inner.start_tls(*args, **kwargs))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingBackend:
    """An httpcore network backend whose streams are `_CountingStream`s."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> _CountingStream:
        return _CountingStream(await self._inner.connect_tcp(*args, **kwargs))

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> _CountingStream:
        return _CountingStream(await self._inner.connect_unix_socket(*args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def count_reads(transport: Any) -> bool:
    """Wrap the sockets of an httpx(2) transport's pool in `_CountingStream`s; False where it has none."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if backend is None:
        return False
    if not isinstance(backend, _CountingBackend):
        pool._network_backend = _CountingBackend(backend)  # type: ignore[union-attr]
    return True


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
                 endpoint: str = "chat", ignore_eos: bool = True, temperature: float = 0.0,
                 continuous_usage: bool = True) -> None:
        http = _http_module()
        self.root = server_root(base_url)
        self.endpoint = endpoint
        self.ignore_eos = ignore_eos
        self.temperature = temperature
        self.stream_options = {"include_usage": True, **({"continuous_usage_stats": True} if continuous_usage else {})}
        limits = http.Limits(max_connections=max_connections, max_keepalive_connections=max_connections or 1024)
        transport = http.AsyncHTTPTransport(limits=limits)
        self.reads_observed = count_reads(transport)
        self.http = openai.DefaultAsyncHttpxClient(transport=transport, timeout=http.Timeout(timeout_s, connect=10.0))
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

    async def model_root(self, model: str) -> Optional[str]:
        """The `root` (vLLM: the model's path) /v1/models gives for `model`, or None."""
        try:
            page = await self.openai.models.list()
        except Exception:  # noqa: BLE001
            return None
        root = next((getattr(m, "root", None) for m in page.data if m.id == model), None)
        return root if isinstance(root, str) else None

    # --- one streamed request ----------------------------------------------------------
    async def send(self, model: str, messages: list[dict[str, str]], max_tokens: int, est_prompt_tokens: int,
                   session: int = 0, turn: int = 0) -> RequestRecord:
        rec = RequestRecord(session=session, turn=turn, max_tokens=max_tokens, prompt_tokens=est_prompt_tokens)
        extra = {"ignore_eos": True} if self.ignore_eos else None
        common = dict(model=model, max_tokens=max_tokens, temperature=self.temperature, stream=True,
                      stream_options=dict(self.stream_options), extra_body=extra)
        reads = ReadLog()
        token = _READS.set(reads)
        rec.start = self.now()
        try:
            if self.endpoint == "chat":
                stream = await self.openai.chat.completions.create(messages=messages, **common)
            else:
                stream = await self.openai.completions.create(prompt=messages_to_text(messages), **common)
            async for chunk in stream:
                now = self.now()
                usage = chunk.usage
                if usage is not None:
                    _take_usage(rec, usage)
                text = _chunk_text(chunk, self.endpoint)
                if text:
                    if reads.count:
                        rec.chunk_times.append(reads.time - self._perf0)
                        rec.chunk_reads.append(reads.count)
                    else:
                        rec.chunk_times.append(now)
                    rec.chunk_texts.append(text)
                    total = getattr(usage, "completion_tokens", None) if usage is not None else None
                    rec.chunk_usage.append(int(total) if total is not None else None)
            rec.end = self.now()
            rec.success = bool(rec.chunk_times)
            if not rec.success:
                rec.error_kind, rec.error = "empty_output", "the stream ended without any text"
        except Exception as error:  # noqa: BLE001 - every failure is recorded, none escapes
            rec.end = self.now()
            rec.success = False
            rec.error_kind, rec.error = classify_error(error)
        finally:
            _READS.reset(token)
        finish_chunks(rec)
        return rec


def finish_chunks(rec: RequestRecord) -> None:
    """The text, the reads (dropped unless every chunk has one) and, from per-chunk usage, the tokens."""
    rec.text = "".join(rec.chunk_texts)
    if len(rec.chunk_reads) != len(rec.chunk_times):
        rec.chunk_reads = []
    counts = usage_chunk_tokens(rec.chunk_usage)
    if counts is not None:
        rec.chunk_tokens, rec.tokens_counted_by = counts, "usage"
    if not rec.output_tokens_from_usage:
        rec.output_tokens = sum(rec.token_counts)


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

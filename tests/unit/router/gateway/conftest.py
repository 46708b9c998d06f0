"""Fixtures of the gateway unit tests: the SmolLM2 tokenizer and a scripted core double.

`FakeCore` implements `RouterCoreAPI` (router/types.py): its `open_stream` runs a scripted
pipeline inside the real `RequestStream`, so the gateway reads chunks exactly as it does from
the real core; closing the stream mid-way records the request as aborted."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

import pytest
from prometheus_client import CollectorRegistry, Counter

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import BatonError
from baton.router.stream import RequestStream
from baton.router.types import Chunk, RouterRequest


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_model_path)


@dataclass
class FakeConfig:
    api_key_list: tuple[str, ...] = ()
    request_timeout_s: float = 30.0
    max_queued_requests: int = 8
    max_request_bytes: int = 64 << 10


class FakeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("baton_router_requests", "requests", ["api", "status"], registry=self.registry)
        self.stream_failures = Counter("baton_router_stream_failures", "streams failed after their first chunk",
                                       ["api", "reason"], registry=self.registry)


class FakeCore:
    """Answers every request with `reply` (one token per chunk, n choices interleaved), or
    fails before the first chunk (`fail_before`) or after `fail_after` chunks."""

    def __init__(self, tokenizer, api_keys: tuple[str, ...] = ()) -> None:
        self.model_name = "smollm2"
        self.tokenizer = tokenizer
        self.max_model_len = 2048
        self.config = FakeConfig(api_key_list=api_keys)
        self.metrics = FakeMetrics()
        self.reply = "Hello there, friend!"
        self.fail_before: Optional[int] = None
        self.fail_after: Optional[int] = None
        self.requests: list[RouterRequest] = []
        self.aborted: list[str] = []
        self.serving = True
        self.hang_after: Optional[int] = None
        """Chunks to send before hanging forever (until cancelled)."""

    def open_stream(self, request: RouterRequest) -> RequestStream:
        return RequestStream(request.request_id, lambda emit: self._script(request, emit))

    async def _script(self, request: RouterRequest, emit) -> None:
        try:
            await self._play(request, emit)
        except asyncio.CancelledError:
            self.aborted.append(request.request_id)
            raise

    async def _play(self, request: RouterRequest, emit) -> None:
        self.requests.append(request)
        if self.fail_before is not None:
            raise BatonError(self.fail_before, "scripted failure")
        ids = self.tokenizer.encode(self.reply)
        n = request.params.n or 1
        sent = 0
        for pos, token in enumerate(ids):
            for index in range(n):
                if self.hang_after is not None and sent == self.hang_after:
                    await asyncio.Event().wait()
                if self.fail_after is not None and sent == self.fail_after:
                    raise BatonError(common_pb2.ErrorCode.NO_WORKER, "every decode worker is gone")
                await asyncio.sleep(0)
                last = pos == len(ids) - 1
                logprobs = []
                if request.params.HasField("logprobs"):
                    top = [common_pb2.TopLogprob(token_id=token, logprob=-0.25)][:request.params.logprobs]
                    logprobs = [common_pb2.TokenLogprob(token_id=token, logprob=-0.25, top_logprobs=top)]
                usage = common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                         completion_tokens=len(ids), cached_tokens=2) if last else None
                emit(Chunk(index=index, token_ids=[token], text=self.tokenizer.decode([token]),
                           logprobs=logprobs, finish_reason="stop" if last else None, usage=usage))
                sent += 1

    async def abort(self, request_id: str, caller=None) -> bool:
        return False

    async def refresh_worker_loads(self) -> None:
        return None

    def worker_statuses(self) -> list[dict]:
        return [{"address": "127.0.0.1:7001", "role": "decode", "healthy": self.serving, "breaker": "closed",
                 "load": {"running_requests": 1, "kv_usage": 0.5}}]

    def is_serving(self) -> bool:
        return self.serving


@pytest.fixture
def fake_core(tokenizer) -> FakeCore:
    return FakeCore(tokenizer)

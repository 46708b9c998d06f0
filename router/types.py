"""The router's own records: a request as the pipeline carries it, the chunks it streams
back, worker views the policies read, and the router's typed error.

The router never imports `services`: sampling parameters travel as the wire message
(`common_pb2.SamplingParams`) and the workers validate them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from baton.protos.baton.v1 import common_pb2


class Role(enum.Enum):
    """What a worker does."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class WorkerView:
    """What a policy may read about one worker (a snapshot)."""

    address: str
    role: Role
    healthy: bool = True
    running_requests: int = 0
    queued_requests: int = 0
    running_tokens: int = 0
    queued_tokens: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0
    """Requests the router itself has sent there and not yet seen finish (fresher than reports)."""

    @property
    def load(self) -> float:
        """One number for min-load comparisons: tokens in the worker's queues plus router-side in-flight work."""
        return self.running_tokens + self.queued_tokens + 64 * self.in_flight + 1000 * self.kv_usage


@dataclass
class RouterRequest:
    """One generation request inside the router."""

    request_id: str
    prompt_token_ids: list[int]
    params: common_pb2.SamplingParams
    timeout_s: float
    """The whole request's deadline, from arrival."""
    n: int = 1


@dataclass
class Chunk:
    """A piece of one completion streamed back to the client."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: str = ""
    usage: Optional[common_pb2.Usage] = None


class RouterError(Exception):
    """A request the router cannot serve; `code` is a `common_pb2.ErrorCode` value."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return common_pb2.ErrorCode.Name(self.code)

"""The router's own records: a request as the pipeline carries it, the chunks it streams
back, worker views the policies read, and `RouterCoreAPI`, what the gateway and the gRPC
service need of a core (the real `RouterCore` and the gateway tests' double both are one).

Errors are `baton.protos.errors.BatonError` throughout. The router never imports
`services`: sampling parameters travel as the wire message (`common_pb2.SamplingParams`)
and the workers validate them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

from baton.protos.baton.v1 import common_pb2

if TYPE_CHECKING:
    from baton.router.config import RouterConfig
    from baton.router.metrics import RouterMetrics


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
    recent_ttft_ms: float = 0.0
    """The worker's recent time to first token, as it reports it (0: no sample)."""
    recent_itl_ms: float = 0.0
    """The worker's recent inter-token latency, as it reports it (0: no sample)."""

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
    owner: str = ""
    """Fingerprint of the API key that started it (router/auth.py); only that key or an admin may abort it."""
    images: list = field(default_factory=list)
    """(encoded bytes, sha256 hex) of each image of the prompt, in placeholder order (docs/vision.md)."""


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
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    """On a completion's first chunk when the request asked for prompt logprobs (see common.proto)."""


class ChunkStream(Protocol):
    """One request's chunks as a consumer reads them (see router/stream.py)."""

    request_id: str

    async def next(self) -> Optional[Chunk]:
        """The next chunk; None at the end; raises BatonError or StreamClosed."""

    def close(self) -> None:
        """Stop reading and abort the request unless it ended."""


class RouterCoreAPI(Protocol):
    """What the HTTP gateway and the gRPC service use of a router core."""

    config: "RouterConfig"
    metrics: "RouterMetrics"
    tokenizer: Any
    model_name: str
    max_model_len: int

    def open_stream(self, request: RouterRequest) -> ChunkStream:
        """Start a request; its chunks come out of the stream."""

    async def abort(self, request_id: str) -> bool:
        """Cancel a running request; True when it was running."""

    def is_serving(self) -> bool:
        """True when a decode worker is healthy."""

    def worker_statuses(self) -> list[dict]:
        """The operators' view of every worker."""

    async def refresh_worker_loads(self) -> None:
        """Fresh load reports before a metrics scrape."""

    async def embed(self, inputs: list[list[int]], *, pooling: str = "last", normalize: bool = True) -> Any:
        """The pooled embedding of every input (an `EmbedResult`: vectors, prompt tokens)."""

"""A minimal gRPC client of the decode service for tests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import OPEN, ClusterCredentials, open_channel
from baton.services.worker.params_codec import sampling_params_to_proto
from baton.services.engine.sampling_params import SamplingParams


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: Optional[object] = None
    prompt_logprobs: list = field(default_factory=list)
    """The TokenLogprob messages of the prompt (when the params asked for them)."""


async def decode_generate(address: str, prompt: list[int], params: SamplingParams, prefill: str = "",
                          request_id: str = "", timeout: float = 60.0,
                          credentials: ClusterCredentials = OPEN) -> list[Completion]:
    """Stream one request through a decode worker; returns one Completion per index."""
    async with open_channel(address, credentials) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)
        request = worker_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=prompt,
                                           params=sampling_params_to_proto(params), prefill_address=prefill)
        completions = [Completion() for _ in range(params.n)]
        async for chunk in stub.Generate(request, timeout=timeout):
            c = completions[chunk.index]
            c.token_ids += list(chunk.token_ids)
            c.text += chunk.text
            c.prompt_logprobs += list(chunk.prompt_logprobs)
            if chunk.finish_reason:
                c.finish_reason, c.usage = chunk.finish_reason, chunk.usage
        return completions


async def worker_info(address: str, credentials: ClusterCredentials = OPEN) -> worker_pb2.WorkerInfo:
    """The Info of a decode worker."""
    async with open_channel(address, credentials) as channel:
        return await worker_pb2_grpc.DecodeStub(channel).Info(worker_pb2.WorkerInfoRequest(), timeout=10)

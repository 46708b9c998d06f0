"""A minimal client of the router's gRPC API (token ids in, token ids out) for tests."""
from __future__ import annotations

import grpc

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc


async def router_generate(address: str, prompt: list[int], max_tokens: int, timeout: float = 60.0,
                          api_key: str = "", **params) -> tuple[list[int], str, common_pb2.Usage]:
    """Greedy (unless params say otherwise) generation through the router; returns (tokens, finish, usage)."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=params.pop("temperature", 0.0),
                                         ignore_eos=params.pop("ignore_eos", True), **params)
    tokens, finish, usage = [], "", None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=sampling)
        async for chunk in stub.Generate(request, timeout=timeout, metadata=metadata):
            tokens += list(chunk.token_ids)
            if chunk.finish_reason:
                finish, usage = chunk.finish_reason, chunk.usage
    return tokens, finish, usage

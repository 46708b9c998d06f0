"""One validation for both front doors (router/validation.py): every value the HTTP request
models refuse, the gRPC Generate refuses too, naming the same field, before any worker sees it
(a real `RouterServicer` over a real `RouterCore` with no workers, on loopback); a gRPC request
without max_tokens gets HTTP's default budget, and a prompt that leaves no room is refused."""
from __future__ import annotations

import asyncio
import math

import grpc
import pydantic
import pytest

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from baton.protos.errors import error_from_rpc
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.gateway.convert import resolve_max_tokens
from baton.router.gateway.protocol import CompletionRequest
from baton.router.grpc_service import RouterServicer
from baton.router.validation import checked_params

BAD = [("n", 129), ("temperature", math.inf), ("temperature", -0.5), ("temperature", 2.5),
       ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.inf), ("min_p", 1.5),
       ("frequency_penalty", 3.0), ("frequency_penalty", -math.inf), ("presence_penalty", -2.5),
       ("repetition_penalty", 0.0), ("repetition_penalty", math.inf)]


@pytest.mark.parametrize("field,value", BAD)
def test_grpc_refuses_what_http_refuses(field, value):
    with pytest.raises(pydantic.ValidationError) as http_error:
        CompletionRequest.model_validate({"prompt": "hi", field: value})
    assert http_error.value.errors()[0]["loc"][0] == field
    with pytest.raises(Exception) as grpc_error:
        checked_params(common_pb2.SamplingParams(**{field: value}), 5, 100)
    assert grpc_error.value.param == field and field in grpc_error.value.message


def test_good_values_pass_both_and_the_budget_is_https():
    good = {"n": 128, "temperature": 2.0, "top_p": 1.0, "min_p": 0.0, "frequency_penalty": -2.0,
            "presence_penalty": 2.0, "repetition_penalty": 1.3}
    CompletionRequest.model_validate({"prompt": "hi", **good})
    resolved = checked_params(common_pb2.SamplingParams(**good), 10, 100)
    assert resolved.max_tokens == resolve_max_tokens(None, 10, 100, chat=False) == 90
    assert checked_params(common_pb2.SamplingParams(max_tokens=7), 10, 100).max_tokens == 7
    assert checked_params(common_pb2.SamplingParams(), 10, 0).HasField("max_tokens") is False  # context unknown


def test_grpc_generate_is_refused_before_any_worker():
    async def scenario():
        core = RouterCore(RouterConfig(model="m"))
        core.max_model_len = 64
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        results = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                for params, prompt in ((common_pb2.SamplingParams(temperature=math.inf), [5, 6]),
                                       (common_pb2.SamplingParams(n=1000), [5, 6]),
                                       (common_pb2.SamplingParams(), list(range(3, 67))),
                                       (common_pb2.SamplingParams(max_tokens=60), list(range(3, 13)))):
                    request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
                    try:
                        async for _ in stub.Generate(request, timeout=10):
                            pass
                        results.append(None)
                    except grpc.RpcError as error:
                        results.append(error)
        finally:
            await server.stop(0)
        return results
    results = asyncio.run(scenario())
    assert all(r is not None and r.code() == grpc.StatusCode.INVALID_ARGUMENT for r in results), results
    assert [error_from_rpc(r).param for r in results] == ["temperature", "n", "prompt", "max_tokens"]

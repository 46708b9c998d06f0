"""The floor of one Python gRPC hop: a minimal `baton.v1.Router.Generate` proxy.

    .venv/bin/python -m baton.bench.grpc_floor_proxy WORKER PORT [--stream]

It forwards each `Router.Generate` to one decode worker's `Decode.Generate` and relays the
responses, with nothing else (no validation, policy, queue, metrics, retries): what a
`grpc.aio` server plus a `grpc.aio` client cost per request in this Python on this machine.
With `--stream` the worker side goes over the router's own data plane instead, one
multiplexed `Decode.GenerateStream` (router/decode_stream.py), so the floor is that of the
router as built. `bench/router_scale.py` measures both next to the real router as
references, so the router's own work is the difference, not the hop every Python router pays.
"""
from __future__ import annotations

import asyncio
import sys

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from baton.protos.baton.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.router.decode_stream import DecodeStreamClient


async def serve(worker: str, port: int, stream: bool = False) -> None:
    """Serve the proxy on 127.0.0.1:`port` until killed (`stream`: over one GenerateStream)."""
    channel = grpc.aio.insecure_channel(worker)
    stub = worker_pb2_grpc.DecodeStub(channel)
    streams = DecodeStreamClient(worker, stub)
    counter = [0]

    def call(request: worker_pb2.DecodeRequest):
        return streams.generate(request, 600.0) if stream else stub.Generate(request)

    class Proxy(router_pb2_grpc.RouterServicer):
        async def Generate(self, request, context):
            counter[0] += 1
            request_id = f"floor-{counter[0]}"
            responses = call(worker_pb2.DecodeRequest(
                request_id=request_id, prompt_token_ids=request.token_ids.ids, params=request.params))
            while (response := await responses.read()) is not grpc.aio.EOF:
                yield router_pb2.GenerateResponse(request_id=request_id, index=response.index,
                                                  token_ids=response.token_ids, finish_reason=response.finish_reason,
                                                  usage=response.usage)

    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(Proxy(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), stream="--stream" in sys.argv[3:]))

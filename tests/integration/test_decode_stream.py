"""`Decode.GenerateStream`, the router's one stream per decode worker (router/decode_stream.py,
services/common/decode_stream.py), against real simulated workers on loopback: concurrent
calls on one stream stream exactly what separate calls do; a worker's typed error, a cancel,
a deadline and a dead worker end one call (or, for the dead worker, the calls on its stream)
as they end separate calls; a worker without the method gets separate calls; and the router
sends its requests on the stream."""
import asyncio

import grpc
import pytest

from baton.protos.baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import open_channel
from baton.protos.errors import ErrorCode, error_from_rpc
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.decode_stream import DecodeStreamClient
from baton.router.types import RouterRequest
from baton.services.common.server import ServerConfig, ServiceServer
from baton.services.sim.cluster import SimCluster
from baton.services.sim.config import SimConfig, SimTiming
from baton.services.sim.servicer import SimDecodeServicer
from baton.services.sim.tokens import expected_tokens

QUICK = SimTiming(prefill_base_s=0.0005, prefill_token_s=1e-6, prefill_attention_s=0, decode_step_s=0.002,
                  decode_seq_s=0, decode_ctx_token_s=0, transfer_base_s=0)


def request(rid: str, prompt: list[int], max_tokens: int, **fields) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt,
                                    params=common_pb2.SamplingParams(max_tokens=max_tokens, **fields))


async def read_all(call) -> list[int]:
    tokens = []
    while (response := await call.read()) is not grpc.aio.EOF:
        tokens += response.token_ids
    assert await call.read() is grpc.aio.EOF  # the end stays the end
    return tokens


async def sim(server: ServerConfig = ServerConfig(metrics_port=-1), **overrides):
    cluster = await SimCluster(SimConfig(sim_decodes=1, **overrides), QUICK, server=server).start()
    address = cluster.decodes[0].address
    channel = open_channel(address)
    return cluster, channel, DecodeStreamClient(address, worker_pb2_grpc.DecodeStub(channel))


def test_concurrent_calls_on_one_stream_equal_separate_calls_and_one_error_ends_only_its_call():
    async def scenario():
        cluster, channel, client = await sim(sim_max_running=64, sim_max_queued=64)
        prompts = [[7 + i, 11, 13 + i * 3] * (4 + i % 5) for i in range(40)]
        streamed = await asyncio.gather(*(read_all(client.generate(request(f"s{i}", p, 5 + i % 7), 10))
                                          for i, p in enumerate(prompts)))
        stub = worker_pb2_grpc.DecodeStub(channel)
        separate = await asyncio.gather(*(read_all(stub.Generate(request(f"c{i}", p, 5 + i % 7), timeout=10))
                                          for i, p in enumerate(prompts)))
        bad = client.generate(request("bad", [1, 2, 3], 4, n=2), 10)  # the sim serves n == 1 only
        good = client.generate(request("good", [1, 2, 3], 4), 10)
        with pytest.raises(grpc.aio.AioRpcError) as streamed_error:
            await read_all(bad)
        good_tokens = await read_all(good)
        with pytest.raises(grpc.aio.AioRpcError) as separate_error:
            await read_all(stub.Generate(request("bad2", [1, 2, 3], 4, n=2), timeout=10))
        opened = client.streams_opened
        await channel.close()
        await cluster.stop()
        return prompts, streamed, separate, streamed_error.value, separate_error.value, good_tokens, opened
    prompts, streamed, separate, streamed_error, separate_error, good_tokens, opened = asyncio.run(scenario())
    assert streamed == separate == [expected_tokens(p, 5 + i % 7) for i, p in enumerate(prompts)]
    assert opened == 1
    assert streamed_error.code() == separate_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    mine, theirs = error_from_rpc(streamed_error), error_from_rpc(separate_error)
    assert (mine.code, mine.message, mine.origin) == (theirs.code, theirs.message, theirs.origin)
    assert mine.code == ErrorCode.INVALID_REQUEST
    assert good_tokens == expected_tokens([1, 2, 3], 4)


def test_cancel_and_deadline_abort_the_call_on_the_worker_and_leave_the_others():
    async def scenario():
        cluster, channel, client = await sim()
        worker = cluster.decodes[0]
        long = client.generate(request("long", [5, 6, 7], 2000), 30)
        short = client.generate(request("short", [5, 6, 8], 20), 30)
        late = client.generate(request("late", [5, 6, 9], 2000), 0.3)
        assert (await long.read()).token_ids  # streaming
        assert long.cancel() and not long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long.read()
        short_tokens = await read_all(short)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await read_all(late)
        for _ in range(200):  # the worker aborted both (its requests end, slots free)
            if worker.running == 0:
                break
            await asyncio.sleep(0.01)
        running, open_calls = worker.running, client.open_calls
        after = await read_all(client.generate(request("after", [9, 9], 3), 10))
        await channel.close()
        await cluster.stop()
        return short_tokens, expired.value.code(), running, open_calls, after
    short_tokens, expired, running, open_calls, after = asyncio.run(scenario())
    assert short_tokens == expected_tokens([5, 6, 8], 20)
    assert expired == grpc.StatusCode.DEADLINE_EXCEEDED
    assert running == 0 and open_calls == 0
    assert after == expected_tokens([9, 9], 3)


def test_a_dead_worker_fails_the_calls_on_its_stream_unreachable_and_a_restarted_one_gets_a_new_stream():
    async def scenario():
        cluster, channel, client = await sim()
        calls = [client.generate(request(f"d{i}", [3, i], 5000), 30) for i in range(3)]
        for call in calls:
            assert (await call.read()).token_ids
        fresh = await cluster.restart(cluster.decodes[0])  # killed, then a new process on the same port
        errors = []
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await read_all(call)
            errors.append(error_from_rpc(failed.value))
        for _ in range(100):  # the channel reconnects to the new worker
            try:
                tokens = await read_all(client.generate(request("again", [4, 4], 3), 5))
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        opened = client.streams_opened
        await channel.close()
        await cluster.stop()
        return errors, tokens, opened, fresh
    errors, tokens, opened, _ = asyncio.run(scenario())
    assert all(e.unreachable for e in errors), [str(e) for e in errors]
    assert tokens == expected_tokens([4, 4], 3)
    assert opened >= 2


class _OlderDecode(worker_pb2_grpc.DecodeServicer):
    """A decode worker of an older build: `Generate` only (GenerateStream answers UNIMPLEMENTED)."""

    def __init__(self, sim_servicer: SimDecodeServicer) -> None:
        self.Generate = sim_servicer.Generate
        self.Info = sim_servicer.Info


def test_a_worker_without_the_stream_gets_separate_calls_through_the_router():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=1), QUICK).start()
        older = ServiceServer(ServerConfig(metrics_port=-1))
        older.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server,
                           _OlderDecode(SimDecodeServicer(cluster.decodes[0])))
        port = await older.start()
        await older.set_serving(True)
        address = f"127.0.0.1:{port}"
        core = RouterCore(RouterConfig(decode=address, health_interval_s=0.5))
        await core.start()
        await core.registry.wait_first_check(10)
        outputs = []
        for i in range(3):  # the first two at once: both waited on the stream that was refused
            prompts = [[2, 3, i], [2, 4, i]] if i == 0 else [[2, 5, i]]
            outputs += await asyncio.gather(*(_generate(core, f"o{i}{j}", p) for j, p in enumerate(prompts)))
        entry = core.registry.workers[address]
        supported = entry._streams.supported
        await core.stop()
        await older.stop(0)
        await cluster.stop()
        return outputs, supported
    outputs, supported = asyncio.run(scenario())
    assert supported is False
    assert outputs == [expected_tokens(p, 4) for p in ([2, 3, 0], [2, 4, 0], [2, 5, 1], [2, 5, 2])]


async def _generate(core: RouterCore, rid: str, prompt: list[int]) -> list[int]:
    tokens = []
    async for chunk in core.generate(RouterRequest(rid, prompt, common_pb2.SamplingParams(max_tokens=4),
                                                   timeout_s=20)):
        tokens += chunk.token_ids
    return tokens


def test_the_router_sends_its_requests_on_one_stream_per_worker():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=2), QUICK).start()
        core = RouterCore(RouterConfig(decode=",".join(cluster.addresses()["decode"]), health_interval_s=0.5))
        await core.start()
        await core.registry.wait_first_check(10)
        prompts = [[8, i, i + 1] for i in range(30)]
        outputs = await asyncio.gather(*(_generate(core, f"r{i}", p) for i, p in enumerate(prompts)))
        opened = [e._streams.streams_opened for e in core.registry.workers.values() if e._streams is not None]
        await core.stop()
        await cluster.stop()
        return prompts, outputs, opened
    prompts, outputs, opened = asyncio.run(scenario())
    assert outputs == [expected_tokens(p, 4) for p in prompts]
    assert opened == [1, 1]


def test_a_draining_worker_stops_without_waiting_out_its_grace_for_the_routers_idle_streams():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=1), QUICK,
                                   server=ServerConfig(metrics_port=-1, drain_timeout_s=30)).start()
        core = RouterCore(RouterConfig(decode=cluster.addresses()["decode"][0], health_interval_s=0.2))
        await core.start()
        await core.registry.wait_first_check(10)
        tokens = await _generate(core, "before", [6, 6, 6])  # the stream is open now, and idle
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(cluster.decodes[0].server.drain(), 10)  # its grace alone is 30 s
        took = asyncio.get_running_loop().time() - started
        await core.stop()
        await cluster.stop()
        return tokens, took
    tokens, took = asyncio.run(scenario())
    assert tokens == expected_tokens([6, 6, 6], 4)
    assert took < 5, took


def test_requests_with_prompt_logprobs_get_a_call_of_their_own():
    """Their responses grow with the prompt: one past the channel's limit must not break the stream."""
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=1), QUICK).start()
        core = RouterCore(RouterConfig(decode=cluster.addresses()["decode"][0], health_interval_s=0.5))
        await core.start()
        await core.registry.wait_first_check(10)
        tokens = []
        params = common_pb2.SamplingParams(max_tokens=4, prompt_logprobs=1)
        async for chunk in core.generate(RouterRequest("plp", [3, 1, 4], params, timeout_s=20)):
            tokens += chunk.token_ids
        streams = next(iter(core.registry.workers.values()))._streams
        await core.stop()
        await cluster.stop()
        return tokens, streams
    tokens, streams = asyncio.run(scenario())
    assert tokens == expected_tokens([3, 1, 4], 4)
    assert streams is None  # no shared stream was opened for it


def test_a_stopping_worker_finishes_the_calls_on_a_stream_and_ends_it_whoever_holds_it():
    """No router health check involved: the worker's own stop ends the stream once its call is done."""
    async def scenario():
        cluster, channel, client = await sim(server=ServerConfig(metrics_port=-1, drain_timeout_s=30))
        assert await read_all(client.generate(request("warm", [2, 2], 2), 10))  # the stream is open
        running = client.generate(request("running", [5, 4, 3], 40), 20)  # 40 steps of 2 ms
        first = list((await running.read()).token_ids)
        loop = asyncio.get_running_loop()
        started = loop.time()
        drain = asyncio.ensure_future(cluster.decodes[0].server.drain())
        tokens = first + await read_all(running)
        await asyncio.wait_for(drain, 10)  # its grace alone is 30 s
        took = loop.time() - started
        await channel.close()
        await cluster.stop()
        return tokens, took
    tokens, took = asyncio.run(scenario())
    assert tokens == expected_tokens([5, 4, 3], 40)  # the call in flight ran to its end
    assert took < 5, took

"""Work that is abandoned stops, work that is drained moves (real router, prefill and decode
workers on loopback, a tiny random-weight model; prefill worker P and decode worker A are
slowed, so a long prompt's prefill and a long stream take seconds there):
- a client that drops during the prefill aborts it on P at once, and a prefill that times out
  at the decode side (--prefill-timeout-s) is cancelled on P too: P is idle again long before
  the prefill would have finished, and serves the next request;
- on SIGTERM, A stops taking work, lets the streams that end within --drain-timeout-s finish
  there (not moved), then hands the rest back with DRAINING: the router moves them to decode
  worker B, where they continue exactly (equal to the offline engine's greedy run)."""
from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import grpc
import pytest

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.protos.errors import error_from_rpc
from baton.services.engine import LLM, SamplingParams
from tests.helpers.grpc_client import decode_generate
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.workers import start_router, start_worker, wait_serving

PROMPT = [3 + (i * 7) % 380 for i in range(640)]  # 80 prefill chunks of 8 tokens: >= 1.6 s on P
PREFILL_TIMEOUT_S = 0.8
DRAIN_S = 3.0
SHORT_PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 16, 17, 18, 19], [20, 21, 22]]
LENGTHS = [30, 30, 400, 400]  # at <= 50 tokens/s on A, two streams end within the drain limit, two do not


def router_sees_healthy(router, count: int, timeout: float = 60.0) -> None:
    """Wait until the router's /workers lists `count` workers, every one healthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(router.http_url + "/workers", timeout=5) as reply:
                rows = json.loads(reply.read())
            if len(rows) >= count and all(row["healthy"] for row in rows):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the router never saw {count} healthy workers")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abandoned")
    model = make_tiny_model("llama", tmp / "model")
    prefill = start_worker("prefill", model, tmp, wait=False, fault="slow_steps", chunked_prefill_size=8)
    first = start_worker("decode", model, tmp, wait=False, fault="slow_steps", prefill_timeout_s=PREFILL_TIMEOUT_S,
                         drain_timeout_s=DRAIN_S)
    second = start_worker("decode", model, tmp, wait=False)
    router = None
    try:
        router = start_router(model, tmp, [prefill.address], [first.address], decode_only_threshold=8)
        for worker in (prefill, first, second):
            wait_serving(worker)
        router_sees_healthy(router, 2)  # else a first request may find no prefill worker and go decode-only
        yield model, router, prefill, first, second
    finally:
        if router is not None:
            router.stop()
        for worker in (prefill, first, second):
            worker.stop(signal.SIGKILL)


async def prefill_busy(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        load = (await worker_pb2_grpc.PrefillStub(channel).Info(worker_pb2.WorkerInfoRequest(), timeout=5)).load
    return load.running_requests + load.queued_requests > 0


async def prefill_idle(address: str) -> bool:
    return not await prefill_busy(address)


async def until(predicate, timeout: float) -> float:
    """Seconds until `predicate()` (a coroutine function) holds; fails after `timeout`."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def router_stream(address: str, prompt: list[int], max_tokens: int, times: list | None = None):
    """(tokens, finish_reason); `times` gets each token's arrival time."""
    tokens, finish = [], ""
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
        async for chunk in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120):
            tokens += list(chunk.token_ids)
            if times is not None:
                times += [time.monotonic()] * len(chunk.token_ids)
            finish = chunk.finish_reason or finish
    return tokens, finish


def router_metric(router, name: str) -> float:
    with urllib.request.urlopen(router.http_url + "/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0].split(" ")[0] == name)


def test_client_dropping_during_prefill_aborts_it_on_the_prefill_worker(cluster):
    _, router, prefill, _, _ = cluster

    async def scenario():
        client = asyncio.ensure_future(router_stream(router.grpc_address, PROMPT, 4))
        await until(lambda: prefill_busy(prefill.address), 10)  # the prefill runs
        await asyncio.sleep(0.2)
        client.cancel()  # the client goes away mid-prefill
        return await until(lambda: prefill_idle(prefill.address), 5)
    idle_after = asyncio.run(scenario())
    assert idle_after < 0.8, idle_after  # the whole prefill takes >= 1.6 s
    assert len(asyncio.run(router_stream(router.grpc_address, PROMPT[:20], 4))[0]) == 4


def test_prefill_timed_out_at_decode_is_cancelled_at_prefill(cluster):
    _, _, prefill, decode, _ = cluster

    async def scenario():
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as excinfo:
            await decode_generate(decode.address, PROMPT, SamplingParams(max_tokens=4, temperature=0.0),
                                  prefill=prefill.address, timeout=30)
        failed_after = time.monotonic() - started
        return excinfo.value, failed_after, await until(lambda: prefill_idle(prefill.address), 5)
    error, failed_after, idle_after = asyncio.run(scenario())
    assert error_from_rpc(error).code_name in ("PREFILL_FAILED", "DEADLINE_EXCEEDED"), error
    assert PREFILL_TIMEOUT_S * 0.9 <= failed_after < PREFILL_TIMEOUT_S + 3
    assert idle_after < 0.6, idle_after


async def register(router, address: str) -> None:
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await stub.RegisterWorker(router_pb2.RegisterWorkerRequest(address=address, role=worker_pb2.DECODE))
        for _ in range(200):
            workers = (await stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
            if any(w.address == address and w.healthy for w in workers):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{address} never turned healthy")


def test_drain_finishes_short_streams_and_moves_the_rest_after_the_limit(cluster):
    """Last in this module: it stops decode worker A."""
    model, router, _, first, second = cluster
    migrated_before = router_metric(router, "baton_router_migrations_total")

    async def run():
        arrivals = [[] for _ in SHORT_PROMPTS]
        tasks = [asyncio.ensure_future(router_stream(router.grpc_address, p, n, t))
                 for p, n, t in zip(SHORT_PROMPTS, LENGTHS, arrivals)]
        while min(len(t) for t in arrivals) < 3:  # every stream is running on A
            await asyncio.sleep(0.01)
        await register(router, second.address)
        first.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        return await asyncio.gather(*tasks), arrivals, signalled
    results, arrivals, signalled = asyncio.run(run())
    llm = LLM(model=str(model), page_size=4, kv_cache_tokens=4096, num_threads=1)
    for (tokens, finish), prompt, n in zip(results, SHORT_PROMPTS, LENGTHS):
        want = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
        assert (tokens, finish) == (want.outputs[0].token_ids, "length")
    for times in arrivals[:2]:  # they ended on A while it drained
        assert times[-1] > signalled
    for times in arrivals[2:]:  # A kept streaming them while it drained, then they moved
        assert any(signalled + 0.2 < t < signalled + DRAIN_S * 0.8 for t in times)
        assert times[-1] > signalled + DRAIN_S
    assert first.proc.wait(30) == 0
    assert router_metric(router, "baton_router_migrations_total") - migrated_before == 2  # the long ones
    assert "past --drain-timeout-s" in first.log(), first.log()[-3000:]

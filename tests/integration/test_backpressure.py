"""Backpressure instead of loss: a 1 prefill + 1 decode cluster on CPU with tight worker
queues and a small decode KV cache, under many more concurrent requests than it can run.

Every request either completes, equal to the greedy reference, or is refused by the router
with RESOURCE_EXHAUSTED / 429 (its own queue full). None fails any other way while every
worker is alive; the router counted the waits; a saturated worker answers health in time.
"""
import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.services.engine import LLM, SamplingParams
from tests.helpers.router_client import router_generate
from tests.helpers.tiny_models import VOCAB, make_tiny_model
from tests.helpers.workers import start_router, start_worker, stop_all, wait_all_serving

pytestmark = pytest.mark.slow

REQUESTS = 48
MAX_NEW = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("backpressure-model"))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(20, 60))] for _ in range(REQUESTS)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    llm = LLM(model=str(model), page_size=4, kv_cache_tokens=8192, num_threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backpressure")
    # Decode: 4 running, 2 queued, KV for ~6 prompts at once (reservations get refused);
    # prefill: 2 queued. The router holds up to 12 requests while both are full.
    prefill, decode = wait_all_serving([
        start_worker("prefill", model, tmp, kv_cache_tokens=1024, max_running_requests=2, max_queued_requests=2,
                     wait=False),
        start_worker("decode", model, tmp, kv_cache_tokens=512, max_running_requests=4, max_queued_requests=2,
                     wait=False)])
    router = start_router(model, tmp, [prefill.address], [decode.address], decode_only_threshold=8,
                          max_queued_requests=12)
    yield router, prefill, decode
    stop_all((router, decode, prefill))


async def _health_latencies(address: str, until: asyncio.Event) -> list[float]:
    """Health checks of `address` every 50 ms while `until` is unset: their latencies (None: failed)."""
    latencies: list = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not until.is_set():
            started = time.monotonic()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                latencies.append(time.monotonic() - started if ok else None)
            except grpc.aio.AioRpcError:
                latencies.append(None)
            await asyncio.sleep(0.05)
    return latencies


def _metric(router, name: str) -> float:
    with urllib.request.urlopen(router.http_url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_saturating_load_completes_or_gets_429(cluster, prompts, expected):
    router, prefill, decode = cluster

    async def scenario():
        done = asyncio.Event()
        health = [asyncio.create_task(_health_latencies(w.address, done)) for w in (decode, prefill)]
        results = await asyncio.gather(*(router_generate(router.grpc_address, p, MAX_NEW, timeout=240)
                                         for p in prompts), return_exceptions=True)
        done.set()
        return results, [await h for h in health]
    results, health = asyncio.run(scenario())
    completed = refused = 0
    for got, want in zip(results, expected):
        if isinstance(got, grpc.RpcError):
            assert got.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{got.code()}: {got.details()}"
            refused += 1
            continue
        assert not isinstance(got, BaseException), repr(got)
        tokens, finish, _ = got
        assert tokens == want and finish == "length"
        completed += 1
    assert completed >= 12, (completed, refused)
    assert _metric(router, "baton_router_backpressure_total") > 0
    assert _metric(router, "baton_router_failures_total") == refused
    for latencies in health:  # a busy worker is not a dead one
        assert latencies and None not in latencies, latencies
        assert max(latencies) < 1.0


def test_http_burst_gets_429_with_retry_after_never_5xx(cluster):
    router, _, _ = cluster

    def post(i: int):
        body = json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2} " * 8, "max_tokens": 16, "ignore_eos": True})
        request = urllib.request.Request(router.http_url + "/v1/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=240) as reply:
                return reply.status, None
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Retry-After")

    with ThreadPoolExecutor(40) as pool:  # 40 clients at once
        replies = list(pool.map(post, range(40)))
    statuses = sorted({status for status, _ in replies})
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses
    assert all(retry and int(retry) >= 1 for status, retry in replies if status == 429)

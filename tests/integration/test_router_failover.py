"""The router in front of real workers, under faults, with 8+ concurrent streams: a decode
worker killed mid-stream loses no token (every stream equals the undisturbed greedy run);
a dead prefill worker's requests are retried elsewhere; with every decode worker down the
client gets NO_WORKER fast; over-admission is refused; API keys are enforced."""
import asyncio
import random
import signal
import time

import grpc
import pytest

from baton.protos.errors import error_from_rpc
from baton.services.engine import LLM, SamplingParams
from tests.helpers.router_client import router_generate
from tests.helpers.tiny_models import VOCAB, make_tiny_model
from tests.helpers.workers import start_router, start_worker, stop_all, wait_all_serving

STREAMS = 8
MAX_NEW = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("router-model"))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(21)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 40))] for _ in range(STREAMS)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    llm = LLM(model=str(model), page_size=4, kv_cache_tokens=8192, num_threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture
def cluster(model, tmp_path):
    started = []

    def start(prefills=1, decodes=2, worker_flags=None, **router_flags):
        workers = {"prefill": [], "decode": []}
        for role, count in (("prefill", prefills), ("decode", decodes)):
            for _ in range(count):  # they load side by side
                worker = start_worker(role, model, tmp_path, wait=False,
                                      **{"kv_cache_tokens": 8192, **(worker_flags or {})})
                started.append(worker)
                workers[role].append(worker)
        wait_all_serving(workers["prefill"] + workers["decode"])
        router = start_router(model, tmp_path, [w.address for w in workers["prefill"]],
                              [w.address for w in workers["decode"]], decode_only_threshold=8, **router_flags)
        started.append(router)
        return router, workers
    yield start
    stop_all(reversed(started))


async def stream_all(router, prompts, on_progress=None, **kwargs):
    progress = [0] * len(prompts)

    async def one(i, prompt):
        tokens = []
        async for chunk in _chunks(router.grpc_address, prompt, **kwargs):
            tokens += chunk
            progress[i] = len(tokens)
            if on_progress:
                on_progress(progress)
        return tokens
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)), return_exceptions=True)


async def _chunks(address, prompt, max_tokens=MAX_NEW, timeout=120.0):
    from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
        async for chunk in stub.Generate(request, timeout=timeout):
            yield list(chunk.token_ids)


def metric(router, name):
    import urllib.request
    with urllib.request.urlopen(router.http_url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_decode_killed_mid_stream_loses_no_token(cluster, prompts, expected):
    router, workers = cluster(prefills=1, decodes=2)
    victim = workers["decode"][0]
    killed = []

    def kill_when_streaming(progress):
        if not killed and min(progress) >= 3:
            killed.append(time.monotonic())
            victim.proc.send_signal(signal.SIGKILL)
    results = asyncio.run(stream_all(router, prompts, on_progress=kill_when_streaming))
    assert killed, "the decode worker was never killed"
    for got, want in zip(results, expected):
        assert not isinstance(got, BaseException), repr(got)
        assert got == want
    assert metric(router, "baton_router_migrations_total") >= 1


def test_dead_prefill_requests_are_retried(cluster, prompts, expected):
    router, workers = cluster(prefills=2, decodes=1, health_interval_s=30)
    workers["prefill"][0].stop(signal.SIGKILL)  # the router will only learn from failed requests
    results = asyncio.run(stream_all(router, prompts, max_tokens=20))
    for got, want in zip(results, expected):
        assert not isinstance(got, BaseException), repr(got)
        assert got == want[:20]
    assert metric(router, "baton_router_retries_total") >= 1


def http_post(router, path, body, key=""):
    import json
    import urllib.error
    import urllib.request
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(router.http_url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_all_decode_workers_down_fails_fast(cluster, prompts):
    router, workers = cluster(prefills=1, decodes=1)
    workers["decode"][0].stop(signal.SIGKILL)
    started = time.monotonic()
    results = asyncio.run(stream_all(router, prompts[:4], max_tokens=5))
    assert time.monotonic() - started < 10
    for result in results:
        assert isinstance(result, grpc.RpcError)
        assert result.code() == grpc.StatusCode.UNAVAILABLE
        assert error_from_rpc(result).code_name in ("NO_WORKER", "INTERNAL")
    started = time.monotonic()
    status, body = http_post(router, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 4})
    assert status == 503 and body["error"]["message"] and time.monotonic() - started < 10


def test_over_admission_is_refused_and_api_keys_enforced(cluster, prompts):
    # The decode worker takes 3 requests at once (2 running + 1 queued); the router holds 2
    # more while it is full and refuses the rest.
    router, _ = cluster(prefills=0, decodes=1, max_queued_requests=2, api_keys="secret",
                        worker_flags={"max_running_requests": 2, "max_queued_requests": 1})
    with pytest.raises(grpc.RpcError) as excinfo:
        asyncio.run(router_generate(router.grpc_address, prompts[0], 4))
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tokens, finish, _ = asyncio.run(router_generate(router.grpc_address, prompts[0], 4, api_key="secret"))
    assert len(tokens) == 4 and finish == "length"

    async def burst():
        return await asyncio.gather(*(router_generate(router.grpc_address, p, 200, api_key="secret")
                                      for p in prompts), return_exceptions=True)
    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert any(not isinstance(r, BaseException) for r in results)
    status, body = http_post(router, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 4})
    assert status == 401 and body["error"]["message"]
    status, body = http_post(router, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 4}, key="secret")
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")

    async def http_burst():
        return await asyncio.gather(*(asyncio.to_thread(http_post, router, "/v1/completions",
                                                        {"prompt": "w5 w6 w7", "max_tokens": 300,
                                                         "ignore_eos": True}, "secret") for _ in range(8)))
    statuses = [status for status, _ in asyncio.run(http_burst())]
    assert 429 in statuses and 200 in statuses


def test_dynamic_register_and_deregister(cluster, model, tmp_path, prompts):
    from baton.protos.baton.v1 import router_pb2, router_pb2_grpc, worker_pb2
    extra = start_worker("decode", model, tmp_path, wait=False)  # loads beside the cluster's worker
    try:
        router, _ = cluster(prefills=0, decodes=1)
        wait_all_serving([extra])

        async def scenario():
            async with grpc.aio.insecure_channel(router.grpc_address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                added = await stub.RegisterWorker(router_pb2.RegisterWorkerRequest(address=extra.address,
                                                                                   role=worker_pb2.DECODE))
                listed = await stub.ListWorkers(router_pb2.ListWorkersRequest())
                health = await stub.Health(router_pb2.RouterHealthRequest())
                removed = await stub.DeregisterWorker(router_pb2.DeregisterWorkerRequest(address=extra.address))
                after = await stub.ListWorkers(router_pb2.ListWorkersRequest())
                return added, listed, health, removed, after
        added, listed, health, removed, after = asyncio.run(scenario())
        assert added.added and removed.removed
        assert {w.address: w.healthy for w in listed.workers}[extra.address]
        assert health.serving and health.healthy_decode == 2
        assert extra.address not in {w.address for w in after.workers}
        tokens, finish, _ = asyncio.run(router_generate(router.grpc_address, prompts[0], 4))
        assert len(tokens) == 4
    finally:
        extra.stop()


def test_frozen_decode_worker_streams_are_rescued(cluster, prompts, expected):
    """SIGSTOP (not kill) a decode worker mid-stream: it stops answering health, the router
    marks it unhealthy after a few checks and moves its streams; nothing waits for it to wake."""
    router, workers = cluster(prefills=1, decodes=2)
    victim = workers["decode"][0]
    frozen = []

    def freeze_when_streaming(progress):
        if not frozen and min(progress) >= 3:
            frozen.append(time.monotonic())
            victim.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = asyncio.run(stream_all(router, prompts, on_progress=freeze_when_streaming))
        elapsed = time.monotonic() - started
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    assert frozen, "the decode worker was never frozen"
    for got, want in zip(results, expected):
        assert not isinstance(got, BaseException), repr(got)
        assert got == want
    assert metric(router, "baton_router_migrations_total") >= 1
    assert elapsed < 60, elapsed  # rescued well before the 60 s stall limit, let alone the request timeout


def test_router_health_is_honest_and_duplicate_ids_are_refused(cluster, prompts):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
    router, workers = cluster(prefills=0, decodes=1)

    async def statuses():
        async with grpc.aio.insecure_channel(router.grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return [(await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
                    for name in ("", "baton.v1.Router")]

    async def duplicate():
        async with grpc.aio.insecure_channel(router.grpc_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            params = common_pb2.SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

            def call():
                return stub.Generate(router_pb2.GenerateRequest(
                    request_id="same-id", token_ids=router_pb2.TokenIds(ids=prompts[0]), params=params), timeout=60)
            first = call()
            got = [list((await first.read()).token_ids)]  # the first request is running
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call():
                    pass
            while (chunk := await first.read()) is not grpc.aio.EOF:
                got.append(list(chunk.token_ids))
            return sum(got, []), refused.value
    tokens, refused = asyncio.run(duplicate())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "already running" in refused.details()
    assert len(tokens) == 60  # the first stream was not disturbed
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def settle(want: int) -> list[int]:  # gRPC health follows the registry within a poll period
        deadline = time.monotonic() + 15
        while (seen := asyncio.run(statuses())) != [want, want] and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen
    assert settle(serving) == [serving, serving], router.log()[-2000:]
    workers["decode"][0].stop(signal.SIGKILL)
    assert settle(not_serving) == [not_serving, not_serving], router.log()[-2000:]


def test_client_errors_never_open_a_breaker(cluster, prompts):
    """Bad requests (an invalid regex, token ids outside the vocabulary) fail alone with 400 /
    INVALID_ARGUMENT; the only decode worker's breaker stays closed for everyone else."""
    router, _ = cluster(prefills=0, decodes=1, breaker_failures=2)
    for _ in range(4):
        status, body = http_post(router, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 4, "regex": "(["})
        assert status == 400, body
        with pytest.raises(grpc.RpcError) as bad:
            asyncio.run(router_generate(router.grpc_address, [VOCAB + 5, 3], 4))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, body = http_post(router, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 4})
    assert status == 200, body
    assert metric(router, "baton_router_breaker_open") == 0

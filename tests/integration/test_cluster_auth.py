"""A cluster closed to strangers, as real processes on loopback: prefill and decode workers with
a cluster secret refuse every call without its token (health stays open for probes) and serve
the router that holds it, disaggregated outputs still equal decode-only ones; a stranger on
the decode worker's KV port changes nothing; registering workers needs the admin key; one API
key cannot abort another's request (gRPC and HTTP)."""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import urllib.error
import urllib.request

import grpc
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import ClusterCredentials
from baton.services.engine import SamplingParams
from baton.services.transfer.descriptor import PeerDescriptor
from tests.helpers.grpc_client import decode_generate, worker_info
from tests.helpers.router_client import router_generate
from tests.helpers.tiny_models import VOCAB, make_tiny_model
from tests.helpers.workers import start_router, start_worker, stop_all, wait_all_serving

ALICE, BOB, ROOT = "alice-key", "bob-key", "root-key"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    model = make_tiny_model("llama", tmp / "model")
    secret = tmp / "cluster.secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    (tmp / "admin-keys").write_text(ROOT + "\n")
    (tmp / "api-keys").write_text(ALICE + "\n")
    prefill, decode = wait_all_serving([start_worker(role, model, tmp, cluster_secret_file=secret, wait=False)
                                        for role in ("prefill", "decode")])
    router = start_router(model, tmp, [prefill.address], [decode.address], decode_only_threshold=0,
                          cluster_secret_file=secret, api_keys_file=tmp / "api-keys",
                          admin_api_keys_file=tmp / "admin-keys", protect_admin_endpoints=True,
                          env={"BATON_API_KEYS": BOB})
    yield {"prefill": prefill, "decode": decode, "router": router,
           "credentials": ClusterCredentials.from_files(str(secret))}
    codes = stop_all((router, decode, prefill))
    assert codes[1:] == [0, 0], decode.log()[-2000:] + prefill.log()[-2000:]


def prompts(seed: int, count: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB) for _ in range(24)]  # a shared "system prompt" prefix
    return [shared + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 30))] for _ in range(count)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


async def _outcomes(address: str, credentials: ClusterCredentials | None) -> dict[str, str]:
    """What the decode and prefill services answer to each call, with or without the token."""
    from baton.protos.cluster_auth import open_channel
    channel = open_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    out = {}
    async with channel:
        decode = worker_pb2_grpc.DecodeStub(channel)
        calls = {
            "Info": lambda: decode.Info(worker_pb2.WorkerInfoRequest(), timeout=5),
            "Abort": lambda: decode.Abort(worker_pb2.AbortRequest(request_id="x"), timeout=5),
            "Generate": lambda: _drain(decode.Generate(worker_pb2.DecodeRequest(
                prompt_token_ids=[5, 6], params=common_pb2.SamplingParams(max_tokens=1)), timeout=10)),
            "Health": lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5),
        }
        for name, call in calls.items():
            try:
                await call()
                out[name] = "ok"
            except grpc.aio.AioRpcError as error:
                out[name] = error.code().name
    return out


async def _drain(stream) -> list:
    return [chunk async for chunk in stream]


def test_workers_refuse_calls_without_the_cluster_token(cluster):
    decode = cluster["decode"].address
    bare = asyncio.run(_outcomes(decode, None))
    assert bare == {"Info": "UNAUTHENTICATED", "Abort": "UNAUTHENTICATED", "Generate": "UNAUTHENTICATED",
                    "Health": "ok"}
    wrong = asyncio.run(_outcomes(decode, ClusterCredentials(secret=b"not this cluster's secret")))
    assert wrong == bare
    assert asyncio.run(_outcomes(decode, cluster["credentials"])) == {
        "Info": "ok", "Abort": "ok", "Generate": "ok", "Health": "ok"}

    async def prefill_for_a_stranger():  # the SSRF path: make prefill dial a KV destination of our choosing
        async with grpc.aio.insecure_channel(cluster["prefill"].address) as channel:
            await worker_pb2_grpc.PrefillStub(channel).Prefill(worker_pb2.PrefillRequest(
                request_id="r", prompt_token_ids=[5, 6]), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(prefill_for_a_stranger())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "refused /baton.v1.Decode/Info" in cluster["decode"].log()


def test_the_router_with_the_secret_serves_the_disaggregated_path(cluster):
    router, credentials = cluster["router"], cluster["credentials"]
    batch = prompts(seed=3)
    before = cluster["prefill"].metric("baton_kv_transfer_bytes_total", direction="out")
    routed = [asyncio.run(router_generate(router.grpc_address, p, 10, api_key=ALICE))[0] for p in batch]
    assert cluster["prefill"].metric("baton_kv_transfer_bytes_total", direction="out") > before
    decode_only = [asyncio.run(decode_generate(cluster["decode"].address, p, GREEDY, credentials=credentials))[0]
                   for p in batch]
    assert routed == [c.token_ids for c in decode_only]


class Stranger:
    """A process-local attacker on a KV port: a DEALER socket and no secret."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, kind: bytes, *frames: bytes, timeout_ms: int = 2000):
        self.sock.send_multipart([kind, os.urandom(8), *frames])
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        reply = self.sock.recv_multipart()
        return reply[0]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def test_a_stranger_on_the_kv_port_changes_nothing(cluster):
    router, decode = cluster["router"], cluster["decode"]
    batch = prompts(seed=4, count=2)  # they share a prefix that the decode worker caches
    reference = [asyncio.run(router_generate(router.grpc_address, p, 10, api_key=ALICE))[0] for p in batch]
    info = asyncio.run(worker_info(decode.address, cluster["credentials"]))
    peer = PeerDescriptor.from_proto(info.transfer)
    num_blocks, block_bytes = peer.layout.num_blocks, peer.layout.regions[0].geometry.block_bytes
    stranger = Stranger(peer.metadata.decode())
    try:
        replies = []
        for start in range(0, num_blocks, 256):  # overwrite every block, a batch at a time
            dst = list(range(start, min(num_blocks, start + 256)))
            header = json.dumps({"transfer_id": f"x{start}", "target_epoch": peer.epoch, "source": "evil",
                                 "dst": dst}).encode()
            payload = [os.urandom(len(dst) * block_bytes)] * peer.layout.regions[0].num_tensors
            replies.append(stranger.send(b"data", os.urandom(56), header, *payload))
        oversize = stranger.send(b"data", b"", b"{}", bytes(num_blocks * block_bytes + 1), timeout_ms=1000)
    finally:
        stranger.close()
    assert set(replies) == {b"unauthenticated"} and oversize is None
    after = [asyncio.run(router_generate(router.grpc_address, p, 10, api_key=ALICE))[0] for p in batch]
    assert after == reference
    assert "KV transfer port dropped an unauthenticated" in decode.log()


def _admin_call(address: str, key: str, method: str, request):
    async def go():
        metadata = (("authorization", f"Bearer {key}"),) if key else None
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(router_pb2_grpc.RouterStub(channel), method)(request, timeout=10, metadata=metadata)
    return asyncio.run(go())


def _http(router, method: str, path: str, key: str = "", body: dict | None = None) -> int:
    request = urllib.request.Request(router.http_url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_registering_workers_needs_the_admin_key(cluster):
    router = cluster["router"]
    register = router_pb2.RegisterWorkerRequest(address="127.0.0.1:9", role=worker_pb2.DECODE)
    for key in ("", ALICE):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _admin_call(router.grpc_address, key, "RegisterWorker", register)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _admin_call(router.grpc_address, ROOT, "RegisterWorker", register).added
    deregister = router_pb2.DeregisterWorkerRequest(address="127.0.0.1:9")
    with pytest.raises(grpc.aio.AioRpcError):
        _admin_call(router.grpc_address, BOB, "DeregisterWorker", deregister)
    assert _admin_call(router.grpc_address, ROOT, "DeregisterWorker", deregister).removed
    assert [_http(router, "GET", "/metrics", key) for key in ("", ALICE, ROOT)] == [401, 403, 200]
    assert [_http(router, "GET", "/workers", key) for key in ("", BOB, ROOT)] == [401, 403, 200]
    assert _http(router, "GET", "/docs", ROOT) == 404 and _http(router, "GET", "/health") == 200


def test_one_key_cannot_abort_another_keys_request(cluster):
    router = cluster["router"]
    prompt = prompts(seed=5, count=1)[0]

    async def grpc_scenario():
        async with grpc.aio.insecure_channel(router.grpc_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            as_key = lambda key: (("authorization", f"Bearer {key}"),)  # noqa: E731
            stream = stub.Generate(router_pb2.GenerateRequest(
                request_id="alice-1", token_ids=router_pb2.TokenIds(ids=prompt),
                params=common_pb2.SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)),
                metadata=as_key(ALICE), timeout=60)
            received = len((await stream.read()).token_ids)
            by_bob = await stub.Abort(worker_pb2.AbortRequest(request_id="alice-1"), metadata=as_key(BOB))
            received += len((await stream.read()).token_ids)  # still streaming
            by_alice = await stub.Abort(worker_pb2.AbortRequest(request_id="alice-1"), metadata=as_key(ALICE))
            try:
                while (chunk := await stream.read()) is not grpc.aio.EOF:
                    received += len(chunk.token_ids)
                ended = "finished"
            except grpc.aio.AioRpcError as error:
                ended = error.code().name
            return by_bob.found, by_alice.found, ended, received
    by_bob, by_alice, ended, received = asyncio.run(grpc_scenario())
    assert (by_bob, by_alice) == (False, True) and ended == "CANCELLED" and received < 900

    async def http_scenario():
        import httpx
        async with httpx.AsyncClient(base_url=router.http_url, timeout=60) as client:
            body = {"prompt": "w5 w6 w7", "max_tokens": 900, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body,
                                     headers={"Authorization": f"Bearer {ALICE}"}) as response:
                lines = response.aiter_lines()
                first = json.loads((await anext(lines)).removeprefix("data: "))
                cancel = f"/v1/requests/{first['id']}/cancel"
                by_bob = await client.post(cancel, headers={"Authorization": f"Bearer {BOB}"})
                by_alice = await client.post(cancel, headers={"Authorization": f"Bearer {ALICE}"})
                rest = [line async for line in lines if line]
            return by_bob.status_code, by_alice.status_code, rest
    by_bob, by_alice, rest = asyncio.run(http_scenario())
    assert (by_bob, by_alice) == (404, 200)
    assert len(rest) < 900 and "[DONE]" not in rest[-1]


def _histogram(text: str, name: str, **labels: str) -> tuple[float, float]:
    """(count, sum) of a histogram's series with `labels`, from real Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                if sample.name == name + "_count":
                    count += sample.value
                elif sample.name == name + "_sum":
                    total += sample.value
    return count, total


def test_the_transfer_and_the_remote_prefill_are_timed_apart(cluster):
    router, prefill, decode = cluster["router"], cluster["prefill"], cluster["decode"]
    for prompt in prompts(seed=6, count=3):
        asyncio.run(router_generate(router.grpc_address, prompt, 4, api_key=ALICE))
    transfers, transfer_s = _histogram(prefill.metrics(), "baton_kv_transfer_seconds", role="prefill")
    calls, call_s = _histogram(decode.metrics(), "baton_worker_remote_prefill_seconds", role="decode")
    assert transfers >= 3 and calls == transfers  # every prefill call moved KV once
    assert 0 < transfer_s < call_s  # the write alone is part of the call (which also queues and computes)
    assert _histogram(decode.metrics(), "baton_kv_transfer_seconds", role="decode")[0] == 0
    request = urllib.request.Request(router.http_url + "/workers", headers={"Authorization": f"Bearer {ROOT}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        rows = {row["address"]: row for row in json.loads(reply.read())}
    for worker in (prefill, decode):
        port = re.search(r"metrics :(\d+)", worker.log()).group(1)
        assert rows[worker.address]["metrics"] == f"127.0.0.1:{port}"

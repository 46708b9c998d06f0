"""Observability that tells the truth (issue 18), read back as real Prometheus text with
prometheus_client's parser: a stream failing after its 200 counts as failed, by reason; gRPC
uses HTTP's status labels; a scrape checks no worker; /workers lists metrics endpoints and no
stale load for a down worker; the dashboard says why a worker is down."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess

import grpc
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.gateway.app import create_app
from baton.router.gateway.dashboard import dashboard_html
from baton.router.gateway.relay import StreamOutcome
from baton.router.main import start_grpc
from baton.services.common.server import ServerConfig, ServiceServer


def samples(text: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one metric's samples in Prometheus text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_a_stream_failing_after_its_200_counts_as_failed_by_reason(fake_core):
    fake_core.fail_after = 2

    async def scrape():
        transport = httpx.ASGITransport(app=create_app(fake_core))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            streamed = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
            fake_core.fail_after = None
            ok = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
            return streamed, ok, (await client.get("/metrics")).text
    streamed, ok, text = asyncio.run(scrape())
    assert streamed.status_code == ok.status_code == 200 and '"error"' in streamed.text
    requests = samples(text, "baton_router_requests_total")
    assert requests[(("api", "completions"), ("status", "503"))] == 1  # what no_worker is before the header
    assert requests[(("api", "completions"), ("status", "200"))] == 1  # the stream that did finish
    assert samples(text, "baton_router_stream_failures_total") == {(("api", "completions"), ("reason", "no_worker")): 1}


def test_a_stream_whose_client_left_counts_as_client_closed():
    outcome = StreamOutcome()
    outcome.see({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    outcome.see({"type": "http.response.body", "body": b'data: {"id":1}\n\n', "more_body": True})
    assert outcome.result() == (499, "client_closed")  # no final body message: the client went away
    outcome.see({"type": "http.response.body", "body": b"", "more_body": False})
    assert outcome.result() == (200, "")


class CountingDecode(worker_pb2_grpc.DecodeServicer):
    """A decode worker's Info (counted) with a metrics port; its health is ServiceServer's."""

    def __init__(self) -> None:
        self.infos = 0

    async def Info(self, request, context):
        self.infos += 1
        return worker_pb2.WorkerInfo(role=worker_pb2.DECODE, worker_id="w0", ready=True, epoch=7, metrics_port=9123,
                                     load=worker_pb2.WorkerLoad(running_requests=3, kv_usage=0.25))


def test_a_scrape_checks_no_worker_and_workers_list_their_metrics_port():
    async def scenario():
        servicer = CountingDecode()
        worker = ServiceServer(ServerConfig(metrics_port=-1), registry=CollectorRegistry())
        worker.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, servicer)
        await worker.start()
        await worker.set_serving(True)
        core = RouterCore(RouterConfig(decode=f"{worker.address},127.0.0.1:1", health_interval_s=3600,
                                       health_timeout_s=2))
        await core.start()
        try:
            await core.registry.wait_first_check(10)
            before = servicer.infos
            transport = httpx.ASGITransport(app=create_app(core))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                texts = [(await client.get("/metrics")).text for _ in range(5)]
                rows = (await client.get("/workers")).json()
            return before, servicer.infos, texts[-1], rows, worker.address
        finally:
            await core.stop()
            await worker.stop(0)

    before, after, text, rows, address = asyncio.run(scenario())
    assert before == after == 1  # five scrapes, no health check
    healthy = samples(text, "baton_router_worker_healthy")
    assert healthy[(("role", "decode"), ("worker", address))] == 1
    assert healthy[(("role", "decode"), ("worker", "127.0.0.1:1"))] == 0
    by_address = {row["address"]: row for row in rows}
    assert by_address[address]["metrics"] == "127.0.0.1:9123"
    assert by_address[address]["load"]["running_requests"] == 3
    down = by_address["127.0.0.1:1"]
    assert down["healthy"] is False and down["load"] is None and "UNAVAILABLE" in down["error"]


def test_grpc_uses_the_http_status_labels():
    async def scenario():
        core = RouterCore(RouterConfig())  # no worker: every request fails with NO_WORKER
        await core.start()
        server, port, health = await start_grpc(core, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(
                            token_ids=router_pb2.TokenIds(ids=[5, 6]),
                            params=common_pb2.SamplingParams(max_tokens=2)), timeout=10):
                        pass
        finally:
            health.cancel()
            await server.stop(0)
            await core.stop()
        from prometheus_client import generate_latest
        return generate_latest(core.metrics.registry).decode()
    text = asyncio.run(scenario())
    assert samples(text, "baton_router_requests_total")[(("api", "grpc"), ("status", "503"))] == 1


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the dashboard's script")
def test_the_dashboard_says_why_a_worker_is_down_and_shows_no_stale_load(tmp_path):
    script = re.search(r"<script>(.*)</script>", dashboard_html("m"), re.S).group(1)
    harness = tmp_path / "dash.js"
    harness.write_text("""
const el = () => ({hidden: true, addEventListener() {}, innerHTML: "", textContent: "", className: ""});
globalThis.document = {getElementById: el};
globalThis.sessionStorage = {getItem: () => null, setItem() {}};
globalThis.fetch = () => Promise.reject(new Error("offline"));
globalThis.setInterval = () => 0;
""" + script + """
const rows = JSON.parse(process.argv[2]);
console.log(JSON.stringify(rows.map(w => workerCells(w, ["kv_usage"]))));
""")
    rows = [{"address": "a:1", "role": "decode", "healthy": True, "breaker": "closed", "error": "",
             "metrics": "a:9100", "load": {"kv_usage": 0.5}},
            {"address": "b:1", "role": "decode", "healthy": False, "breaker": "open",
             "error": "UNAVAILABLE: <connection refused>", "metrics": "b:9100", "load": None}]
    out = subprocess.run(["node", str(harness), json.dumps(rows)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    up, down = json.loads(out.stdout)
    assert "healthy" in up[2] and up[3] == "" and up[5] == "a:9100" and up[-1] == "0.500"
    assert "down" in down[2] and down[3] == "UNAVAILABLE: &lt;connection refused&gt;"  # the reason, escaped
    assert "0.5" not in down[-1] and "–" in down[-1]  # no stale load


def test_a_grpc_stream_failing_mid_way_counts_like_http(fake_core):
    from baton.router.grpc_service import RouterServicer

    class Core(type(fake_core)):
        async def generate(self, request):
            stream = self.open_stream(request)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                stream.close()

    core = Core(fake_core.tokenizer)
    core.config = RouterConfig()
    core.fail_after = 2

    async def scenario():
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        received = 0
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    async for chunk in router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(
                            token_ids=router_pb2.TokenIds(ids=[5, 6]),
                            params=common_pb2.SamplingParams(max_tokens=20)), timeout=10):
                        received += len(chunk.token_ids)
            return received, failed.value.code()
        finally:
            await server.stop(0)
    received, code = asyncio.run(scenario())
    assert received == 2 and code == grpc.StatusCode.UNAVAILABLE
    from prometheus_client import generate_latest
    text = generate_latest(core.metrics.registry).decode()
    assert samples(text, "baton_router_requests_total") == {(("api", "grpc"), ("status", "503")): 1}
    assert samples(text, "baton_router_stream_failures_total") == {(("api", "grpc"), ("reason", "no_worker")): 1}

"""ServiceServer: health, reflection, /metrics, typed errors over a real channel, drain on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.errors import BatonError, ErrorCode, abort_with, error_from_rpc
from baton.services.common.server import ServerConfig, ServiceServer, free_port, wait_for_health

REPO_ROOT = Path(__file__).resolve().parents[3]
DECODE = "baton.v1.Decode"


class InfoOnlyDecode(worker_pb2_grpc.DecodeServicer):
    """Info answers; Abort fails with OVERLOADED (to exercise typed errors)."""

    async def Info(self, request, context):
        return worker_pb2.WorkerInfo(role=worker_pb2.DECODE, worker_id="w0")

    async def Abort(self, request, context):
        await abort_with(context, BatonError(ErrorCode.OVERLOADED, "queue full"))


async def _started(**config) -> ServiceServer:
    server = ServiceServer(ServerConfig(**config), registry=CollectorRegistry())
    assert server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, InfoOnlyDecode()) == [DECODE]
    await server.start()
    return server


async def _health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=5)
        return reply.status


def test_config_validation() -> None:
    for bad in (dict(port=-1), dict(metrics_port=-2), dict(drain_timeout_s=-1), dict(max_message_mb=0),
                dict(host="")):
        with pytest.raises(ValueError):
            ServerConfig(**bad)


def test_health_goes_serving_only_when_told() -> None:
    async def main() -> None:
        server = await _started(metrics_port=-1)
        try:
            assert server.port and server.port > 0 and server.metrics_port is None
            for service in ("", DECODE):
                assert await _health(server.address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(TimeoutError, match="NOT_SERVING"):
                await wait_for_health(server.address, timeout=0.3)
            await server.set_serving(True)
            for service in ("", DECODE):
                assert await _health(server.address, service) == health_pb2.HealthCheckResponse.SERVING
            await wait_for_health(server.address, timeout=5, service=DECODE)
            async with grpc.aio.insecure_channel(server.address) as channel:
                info = await worker_pb2_grpc.DecodeStub(channel).Info(worker_pb2.WorkerInfoRequest(), timeout=5)
            assert info.worker_id == "w0"
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_wait_for_health_times_out_without_a_server() -> None:
    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="UNAVAILABLE"):
            await wait_for_health(f"127.0.0.1:{free_port()}", timeout=0.5)
        assert time.monotonic() - start < 3
    asyncio.run(main())


def test_reflection_lists_services() -> None:
    async def main() -> None:
        server = await _started(metrics_port=-1)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                replies = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=5)]
            names = {s.name for s in replies[0].list_services_response.service}
            assert {DECODE, "grpc.health.v1.Health"} <= names
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_metrics_endpoint_serves_the_given_registry() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        requests = Counter("baton_test_requests", "Requests seen by the test.", registry=registry)
        requests.inc(3)
        server = ServiceServer(ServerConfig(), registry=registry)
        server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, InfoOnlyDecode())
        await server.start()
        try:
            assert server.metrics_port and server.metrics_port != server.port
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert "baton_test_requests_total 3.0" in body
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_typed_error_reaches_the_client() -> None:
    async def main() -> None:
        server = await _started(metrics_port=-1)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await worker_pb2_grpc.DecodeStub(channel).Abort(worker_pb2.AbortRequest(request_id="r"), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            error = error_from_rpc(info.value, default=ErrorCode.INTERNAL)
            assert error.code == ErrorCode.OVERLOADED and error.message == "queue full"
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_drain_is_bounded_and_a_second_signal_stops_at_once() -> None:
    async def main() -> None:
        hung = asyncio.Event()

        async def never_finishes() -> None:
            hung.set()
            await asyncio.Event().wait()

        server = ServiceServer(ServerConfig(metrics_port=-1, drain_timeout_s=0.3), on_drain=never_finishes)
        server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, InfoOnlyDecode())
        await server.start()
        await server.set_serving(True)
        start = time.monotonic()
        await server.drain()
        assert time.monotonic() - start < 2 and hung.is_set() and server.draining
        with pytest.raises(BatonError) as info:
            server.ensure_accepting()
        assert info.value.code == ErrorCode.DRAINING
        await server.wait_for_termination()

        server = ServiceServer(ServerConfig(metrics_port=-1, drain_timeout_s=60), on_drain=never_finishes)
        server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, InfoOnlyDecode())
        await server.start()
        server.install_signal_handlers(signals=(signal.SIGUSR2,))
        start = time.monotonic()
        os.kill(os.getpid(), signal.SIGUSR2)
        await asyncio.sleep(0.1)
        assert server.draining
        os.kill(os.getpid(), signal.SIGUSR2)
        await asyncio.wait_for(server.wait_for_termination(), timeout=5)
        assert time.monotonic() - start < 5
    asyncio.run(main())


DRAIN_SERVER = textwrap.dedent("""
    import asyncio, sys
    from prometheus_client import CollectorRegistry
    from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
    from baton.protos.errors import BatonError, abort_with
    from baton.services.common.server import ServerConfig, ServiceServer

    class SlowDecode(worker_pb2_grpc.DecodeServicer):
        def __init__(self):
            self.server, self.running = None, 0

        async def Abort(self, request, context):  # "slow" takes 1.5 s; refused while draining
            try:
                self.server.ensure_accepting()
            except BatonError as e:
                await abort_with(context, e)
            self.running += 1
            try:
                if request.request_id == "slow":
                    print("SLOW-STARTED", flush=True)
                    await asyncio.sleep(1.5)
                return worker_pb2.AbortResponse(found=True)
            finally:
                self.running -= 1

        async def drain(self):
            while self.running:
                await asyncio.sleep(0.02)
            print("DRAINED", flush=True)

    async def main():
        servicer = SlowDecode()
        server = ServiceServer(ServerConfig(drain_timeout_s=5.0, metrics_port=-1), CollectorRegistry(),
                               on_drain=servicer.drain)
        servicer.server = server
        server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, servicer)
        port = await server.start()
        await server.set_serving(True)
        server.install_signal_handlers()
        print("PORT", port, flush=True)
        await server.wait_for_termination()
        print("EXITING", flush=True)

    asyncio.run(main())
""")


def test_sigterm_drains_in_flight_and_refuses_new_work() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", DRAIN_SERVER], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line + proc.stderr.read()
        address = f"127.0.0.1:{int(line.split()[1])}"

        async def main() -> float:
            await wait_for_health(address, timeout=10)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.DecodeStub(channel)
                slow = asyncio.ensure_future(stub.Abort(worker_pb2.AbortRequest(request_id="slow"), timeout=10))
                assert await asyncio.to_thread(proc.stdout.readline) == "SLOW-STARTED\n"
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Abort(worker_pb2.AbortRequest(request_id="new"), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_from_rpc(refused.value).code == ErrorCode.DRAINING
                for service in ("", DECODE):
                    assert await _health(address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert not slow.done()
                assert (await slow).found  # the in-flight RPC completed
                return sent

        sent = asyncio.run(main())
        assert proc.wait(timeout=8) == 0
        assert time.monotonic() - sent < 5.0  # done when the work was, not at drain_timeout_s
        rest = proc.stdout.read()
        assert "DRAINED" in rest and "EXITING" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_free_ports_are_distinct_and_bindable():
    import socket

    from baton.services.common.server import free_ports
    ports = free_ports(64)
    assert len(set(ports)) == 64
    held = []
    try:
        for port in ports:  # every one can be bound at once: none was handed out twice
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            held.append(sock)
    finally:
        for sock in held:
            sock.close()

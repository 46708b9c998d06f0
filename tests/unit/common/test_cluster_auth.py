"""The cluster credential over real gRPC (protos/cluster_auth.py through ServiceServer): with a
secret every unary and streaming call but health needs the token; `open_channel` adds it;
TLS and mTLS with the TLS flags; no secret keeps the server open."""
from __future__ import annotations

import asyncio
import secrets
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import ClusterCredentials, open_channel, read_secret_file
from baton.protos.errors import error_from_rpc
from baton.services.common.server import ServerConfig, ServiceServer, wait_for_health


class TinyDecode(worker_pb2_grpc.DecodeServicer):
    """Info and a two-chunk Generate: enough to see a unary and a streaming call pass or fail."""

    async def Info(self, request, context):
        return worker_pb2.WorkerInfo(role=worker_pb2.DECODE, worker_id="w0")

    async def Generate(self, request, context):
        for token in (1, 2):
            yield worker_pb2.DecodeResponse(token_ids=[token])

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=True)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "cluster.secret"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


async def _serve(**config) -> ServiceServer:
    server = ServiceServer(ServerConfig(**config), registry=CollectorRegistry())
    server.add_servicer(worker_pb2_grpc.add_DecodeServicer_to_server, TinyDecode())
    await server.start()
    await server.set_serving(True)
    return server


async def _calls(channel: grpc.aio.Channel) -> list[str]:
    """The outcome of Info, Generate and Abort: "ok" or the status code's name."""
    stub, outcomes = worker_pb2_grpc.DecodeStub(channel), []
    for call in (lambda: stub.Info(worker_pb2.WorkerInfoRequest(), timeout=5),
                 lambda: _drain(stub.Generate(worker_pb2.DecodeRequest(), timeout=5)),
                 lambda: stub.Abort(worker_pb2.AbortRequest(request_id="x"), timeout=5)):
        try:
            await call()
            outcomes.append("ok")
        except grpc.aio.AioRpcError as error:
            outcomes.append(error.code().name)
    return outcomes


async def _drain(stream) -> list:
    return [chunk async for chunk in stream]


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def test_a_secret_closes_everything_but_health(secret_file):
    async def scenario():
        server = await _serve(cluster_secret_file=str(secret_file), metrics_port=-1)
        member = ClusterCredentials.from_files(str(secret_file))
        other = ClusterCredentials(secret=b"another cluster's secret")
        try:
            async with grpc.aio.insecure_channel(server.address) as bare:
                refused = await _calls(bare)
                health = await _health(bare)
                try:
                    await worker_pb2_grpc.DecodeStub(bare).Info(worker_pb2.WorkerInfoRequest(), timeout=5)
                except grpc.aio.AioRpcError as error:
                    typed = error_from_rpc(error).code_name
            async with open_channel(server.address, other) as wrong:
                wrong_key = await _calls(wrong)
            async with open_channel(server.address, member) as channel:
                served = await _calls(channel)
            return refused, health, typed, wrong_key, served
        finally:
            await server.stop(0)

    refused, health, typed, wrong_key, served = asyncio.run(scenario())
    assert refused == wrong_key == ["UNAUTHENTICATED"] * 3
    assert health == health_pb2.HealthCheckResponse.SERVING and typed == "UNAUTHENTICATED"
    assert served == ["ok"] * 3


def test_without_a_secret_the_server_stays_open():
    async def scenario():
        server = await _serve(metrics_port=-1)
        try:
            async with grpc.aio.insecure_channel(server.address) as bare:
                return await _calls(bare)
        finally:
            await server.stop(0)
    assert asyncio.run(scenario()) == ["ok"] * 3


def test_secret_files_must_hold_a_real_secret(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_secret_file(str(short))
    with pytest.raises(ValueError, match="go together"):
        ClusterCredentials.from_files(tls_cert_file=str(short))


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, and a certificate it signed for 127.0.0.1 / localhost (server and client use)."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=baton-test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(d / "node.key"),
             "-out", str(d / "node.csr"))
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                           "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", str(d / "node.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext"), "-out", str(d / "node.pem"))
    return d


def test_mutual_tls_with_the_secret(pki, secret_file):
    files = dict(tls_cert_file=str(pki / "node.pem"), tls_key_file=str(pki / "node.key"),
                 tls_ca_file=str(pki / "ca.pem"))

    async def scenario():
        server = await _serve(cluster_secret_file=str(secret_file), metrics_port=-1, **files)
        member = ClusterCredentials.from_files(str(secret_file), **files)
        no_client_cert = ClusterCredentials(secret=member.secret, tls_ca=member.tls_ca)
        try:
            await wait_for_health(server.address, 5, credentials=member)  # probes speak TLS too
            async with grpc.aio.insecure_channel(server.address) as plaintext:
                try:
                    await _health(plaintext)
                    plain = "ok"
                except grpc.aio.AioRpcError as error:
                    plain = error.code().name
            async with open_channel(server.address, no_client_cert) as channel:
                anonymous = await _calls(channel)
            async with open_channel(server.address, member) as channel:
                served = await _calls(channel)
            return plain, anonymous, served
        finally:
            await server.stop(0)

    plain, anonymous, served = asyncio.run(scenario())
    assert plain == "UNAVAILABLE"  # no plaintext on a TLS port
    assert anonymous == ["UNAVAILABLE"] * 3  # mTLS: the handshake itself fails without a client certificate
    assert served == ["ok"] * 3

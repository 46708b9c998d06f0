"""The worker's KV transfer listener binds the --host it serves on (not a hard-coded loopback),
unless --transfer-host says otherwise, and proves a key derived from the cluster secret."""
from __future__ import annotations

from baton.protos.baton.v1 import worker_pb2
from baton.protos.cluster_auth import ClusterCredentials, derive_key
from baton.services.engine.config import EngineConfig
from baton.services.worker.worker_config import WorkerConfig
from baton.services.worker.worker_runtime import WorkerRuntime


def test_the_transfer_binds_the_server_host_and_proves_the_cluster_key():
    runtime = WorkerRuntime(worker_pb2.DECODE, EngineConfig(), WorkerConfig())
    runtime.server_host = "10.1.2.3"
    assert runtime._transfer_options() == {"host": "10.1.2.3", "advertise_host": None, "auth_key": b""}
    runtime.credentials = ClusterCredentials(secret=b"s" * 32)
    options = runtime._transfer_options()
    assert options["auth_key"] == derive_key(b"s" * 32, "kv transfer") and len(options["auth_key"]) == 32
    assert options["auth_key"] != bytes.fromhex(runtime.credentials.token)  # not the gRPC token
    pinned = WorkerRuntime(worker_pb2.DECODE, EngineConfig(), WorkerConfig(transfer_host="0.0.0.0",
                                                                           advertise_host="pod-ip"))
    assert pinned._transfer_options()["host"] == "0.0.0.0" and pinned._transfer_options()["advertise_host"] == "pod-ip"
    assert WorkerRuntime(worker_pb2.DECODE, EngineConfig(), WorkerConfig(transfer="nixl"))._transfer_options() == {
        "auth_key": b""}


def test_the_nccl_backend_listens_like_tcp():
    """nccl's control plane and rendezvous store are tcp's listener: it gets the same host options."""
    runtime = WorkerRuntime(worker_pb2.PREFILL, EngineConfig(), WorkerConfig(transfer="nccl"))
    runtime.server_host = "10.1.2.3"
    assert runtime._transfer_options() == {"host": "10.1.2.3", "advertise_host": None, "auth_key": b""}

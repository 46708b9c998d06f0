"""Faults between real prefill and decode processes: a prefill killed mid-transfer fails
the decode request fast with a typed error and frees its blocks; a restarted peer is
re-handshaked; a KV layout mismatch is a clear error; health is SERVING only once the
model is loaded; SIGTERM drains a streaming request before the process exits."""
import asyncio
import signal
import threading
import time

import grpc
import pytest

from baton.protos.errors import ErrorCode, error_from_rpc
from baton.services.engine import LLM, SamplingParams
from tests.helpers.grpc_client import decode_generate, worker_info
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.workers import start_worker, wait_all_serving, wait_serving

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("faults-model"))


@pytest.fixture(scope="module")
def expected(model):
    llm = LLM(model=str(model), page_size=4, kv_cache_tokens=4096, num_threads=1)
    return llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids


def generate(decode, prefill, timeout=30.0):
    return asyncio.run(decode_generate(decode.address, PROMPT, GREEDY, prefill=prefill, timeout=timeout))[0]


def error_code(excinfo):
    return ErrorCode.Name(error_from_rpc(excinfo.value).code)


@pytest.mark.parametrize("transfer", ["tcp", "nixl"])
def test_prefill_killed_mid_transfer_fails_fast_and_frees_blocks(model, tmp_path, transfer):
    decode, prefill = wait_all_serving([start_worker("decode", model, tmp_path, transfer=transfer, wait=False),
                                        start_worker("prefill", model, tmp_path, transfer=transfer, fault="slow_transfer",
                                                     wait=False)])
    try:
        killer = threading.Timer(1.5, lambda: prefill.proc.send_signal(signal.SIGKILL))
        killer.start()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as excinfo:
            generate(decode, prefill.address)
        assert time.monotonic() - started < 10
        assert error_code(excinfo) == "PREFILL_FAILED"
        load = asyncio.run(worker_info(decode.address)).load
        assert load.kv_usage == 0 and load.running_requests == 0
    finally:
        prefill.stop(signal.SIGKILL)
        assert decode.stop() == 0


@pytest.mark.parametrize("transfer", ["tcp", "nixl"])
def test_restarted_peers_are_rehandshaked(model, tmp_path, transfer, expected):
    decode, prefill = wait_all_serving([start_worker(role, model, tmp_path, transfer=transfer, wait=False)
                                        for role in ("decode", "prefill")])
    try:
        assert generate(decode, prefill.address).token_ids == expected
        old_epoch = asyncio.run(worker_info(decode.address)).epoch
        decode.stop(signal.SIGKILL)
        decode = start_worker("decode", model, tmp_path, transfer=transfer, port=decode.port)
        assert asyncio.run(worker_info(decode.address)).epoch != old_epoch
        assert generate(decode, prefill.address).token_ids == expected  # prefill re-handshakes
        prefill.stop(signal.SIGKILL)
        prefill = start_worker("prefill", model, tmp_path, transfer=transfer, port=prefill.port)
        assert generate(decode, prefill.address).token_ids == expected  # decode reaches the new prefill
    finally:
        prefill.stop(signal.SIGKILL)
        decode.stop(signal.SIGKILL)


def test_kv_layout_mismatch_is_a_clear_error(model, tmp_path):
    decode, prefill = wait_all_serving([start_worker("decode", model, tmp_path, page_size=8, wait=False),
                                        start_worker("prefill", model, tmp_path, page_size=4, wait=False)])
    try:
        with pytest.raises(grpc.RpcError) as excinfo:
            generate(decode, prefill.address)
        assert error_code(excinfo) == "LAYOUT_MISMATCH"
        assert "page_size" in excinfo.value.details()
        assert asyncio.run(worker_info(decode.address)).load.kv_usage == 0
    finally:
        prefill.stop()
        decode.stop()


def test_unreachable_prefill_fails_fast(model, tmp_path):
    decode = start_worker("decode", model, tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as excinfo:
            generate(decode, "127.0.0.1:1")
        assert error_code(excinfo) == "PREFILL_FAILED" and time.monotonic() - started < 10
    finally:
        decode.stop()


def test_health_is_serving_only_after_the_model_loaded(model, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    worker = start_worker("decode", model, tmp_path, fault="slow_start", wait=False)
    try:
        seen = []

        async def poll():
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(200):
                    try:
                        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        seen.append(reply.status)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.05)
        asyncio.run(poll())
        assert seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert seen[-1] == health_pb2.HealthCheckResponse.SERVING
        wait_serving(worker)
        assert asyncio.run(worker_info(worker.address)).ready
    finally:
        worker.stop()


def test_wedged_engine_reports_not_serving_until_it_moves(model, tmp_path):
    """One engine step hangs for 8 s (failure injection): health turns NOT_SERVING once the
    step passes --engine-stall-timeout-s, SERVING again when the engine moves, and the request
    that was running still completes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    worker = start_worker("decode", model, tmp_path, fault="wedge_engine", engine_stall_timeout_s=1.5)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    try:
        async def scenario():
            request = asyncio.create_task(decode_generate(worker.address, [5, 6, 7], params, timeout=60))
            seen = []
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while not request.done():
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    seen.append(reply.status)
                    await asyncio.sleep(0.2)
                await asyncio.sleep(2.5)  # the watchdog's next look
                seen.append((await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status)
            return await request, seen
        [completion], seen = asyncio.run(scenario())
    finally:
        worker.stop()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert len(completion.token_ids) == 8
    assert not_serving in seen and seen[-1] == serving
    assert seen.index(not_serving) > 0 and seen[0] == serving


def test_sigterm_drains_a_running_stream(model, tmp_path):
    decode = start_worker("decode", model, tmp_path, drain_timeout_s=60)  # room on a loaded CI machine
    params = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)

    async def stream_while_terminating():
        task = asyncio.create_task(decode_generate(decode.address, PROMPT, params))
        await asyncio.sleep(0.3)
        decode.proc.send_signal(signal.SIGTERM)
        return await task
    [completion] = asyncio.run(stream_while_terminating())
    assert len(completion.token_ids) == 900 and completion.finish_reason == "length"
    assert decode.proc.wait(60) == 0

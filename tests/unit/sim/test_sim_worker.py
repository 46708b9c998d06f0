"""Simulated workers over real gRPC on loopback: deterministic streams, the disaggregated
path, a KV pool with real hits and evictions whose KV events mirror it, Info / load
reports, and the injected faults (OVERLOADED, die, hang, flapping health)."""
import asyncio
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.protos.baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from baton.protos.block_hash import block_hashes
from baton.protos.errors import ErrorCode, error_from_rpc
from baton.services.sim.cluster import SimCluster
from baton.services.sim.config import SimConfig, SimFaults, SimTiming
from baton.services.sim.kv_cache import SimKVCache
from baton.services.sim.tokens import TokenStream, expected_tokens

FAST = SimTiming(prefill_base_s=0, prefill_token_s=0, prefill_attention_s=0, decode_step_s=0.001, decode_seq_s=0,
                 decode_ctx_token_s=0, transfer_base_s=0)


async def _generate(address, prompt, max_tokens, rid="r", prefill="", resume=()):
    async with grpc.aio.insecure_channel(address) as channel:
        tokens, usage = [], None
        resumed = [worker_pb2.ResumedCompletion(index=0, output_token_ids=list(resume))] if resume else []
        async for chunk in worker_pb2_grpc.DecodeStub(channel).Generate(worker_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=prompt, prefill_address=prefill, resume=resumed,
                params=common_pb2.SamplingParams(max_tokens=max_tokens)), timeout=10):
            tokens += chunk.token_ids
            if chunk.finish_reason:
                usage = chunk.usage
        return tokens, usage


def test_token_stream_continues_exactly_after_a_resubmission():
    prompt = list(range(50))
    whole = expected_tokens(prompt, 30)
    assert len(set(whole)) > 20  # not a constant stream
    assert expected_tokens(prompt + whole[:12], 18) == whole[12:]
    assert expected_tokens(prompt, 30, seed=1) != whole
    assert TokenStream(prompt, 32000).peek() == whole[0]


def test_streams_are_deterministic_and_the_disaggregated_path_matches_decode_only():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_prefills=1, sim_decodes=2), FAST).start()
        try:
            prompt = list(range(100, 180))
            local, usage_local = await _generate(cluster.decodes[0].address, prompt, 12, "a")
            remote, usage_remote = await _generate(cluster.decodes[1].address, prompt, 12, "b",
                                                   prefill=cluster.prefills[0].address)
            again, usage_again = await _generate(cluster.decodes[0].address, prompt, 12, "c")
            resumed, usage_resumed = await _generate(cluster.decodes[1].address, prompt, 12, "d", resume=local[:5])
            assert resumed == local[5:] and usage_resumed.completion_tokens == 12
            return local, remote, again, usage_local, usage_again, cluster.prefills[0].completed
        finally:
            await cluster.stop()
    local, remote, again, usage_local, usage_again, prefilled = asyncio.run(scenario())
    assert local == remote == again == expected_tokens(list(range(100, 180)), 12)
    assert prefilled == 1
    assert (usage_local.prompt_tokens, usage_local.completion_tokens, usage_local.cached_tokens) == (80, 12, 0)
    assert usage_again.cached_tokens == 80  # whole pages of the prompt, cached by the first request


def test_kv_cache_hits_evicts_lru_and_its_events_mirror_it():
    class Recorder:
        def __init__(self):
            self.blocks = set()

        def stored_hashes(self, parent, hashes):
            assert not self.blocks & set(hashes), "a block stored twice"
            self.blocks |= set(hashes)

        def removed_hashes(self, hashes):
            assert set(hashes) <= self.blocks, "a block removed that was never stored"
            self.blocks -= set(hashes)

    recorder = Recorder()
    cache = SimKVCache(num_blocks=64, block_size=4, publisher=recorder)
    rng = random.Random(3)
    systems = [[rng.randrange(1000) for _ in range(32)] for _ in range(6)]
    held = []
    for step in range(400):
        prompt = rng.choice(systems) + [rng.randrange(1000) for _ in range(rng.randrange(0, 20))]
        allocation = cache.acquire(prompt, 4)
        if allocation is None:
            assert held, "an empty pool refused a request that fits"
        else:
            assert allocation.cached_tokens == 4 * len([h for h in allocation.held])
            cache.store(allocation, prompt)
            held.append(allocation)
        while held and (len(held) > 3 or allocation is None):
            done = held.pop(rng.randrange(len(held)))
            cache.release(done)
            allocation = done
        cache.check_integrity()
        assert recorder.blocks == cache.cached_hashes()
    assert cache.evicted_blocks > 0 and cache.tokens_matched > 0
    for done in held:
        cache.release(done)
    for system in systems:  # a look-up sees exactly what an acquire then finds
        expected = cache.matched_tokens(system)
        allocation = cache.acquire(system, 0)
        assert allocation.hashes == block_hashes(system, 4) and allocation.cached_tokens == expected
        cache.release(allocation)
    assert any(cache.matched_tokens(s) == 32 for s in systems)


def test_info_reports_load_capacity_and_recent_latency():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=1, sim_max_running=4, sim_max_queued=6), FAST).start()
        worker = cluster.decodes[0]
        try:
            await _generate(worker.address, list(range(40)), 5)
            async with grpc.aio.insecure_channel(worker.address) as channel:
                return await worker_pb2_grpc.DecodeStub(channel).Info(worker_pb2.WorkerInfoRequest())
        finally:
            await cluster.stop()
    info = asyncio.run(scenario())
    assert info.role == worker_pb2.DECODE and info.ready and not info.draining and info.epoch
    assert info.load.max_requests == 10 and info.load.prefix_tokens_looked_up == 40
    assert info.load.recent_ttft_ms > 0 and info.load.recent_itl_ms > 0
    assert info.transfer.layout.page_size == 16


def test_faults_overloaded_die_hang_and_flapping_health():
    async def scenario():
        cluster = SimCluster(SimConfig(sim_decodes=0), FAST)
        refusing = await cluster.add(worker_pb2.DECODE, overloaded_fraction=1.0)
        dying = await cluster.add(worker_pb2.DECODE, die_after_requests=1)
        hanging = await cluster.add(worker_pb2.DECODE, hang_after_requests=2)
        flapping = await cluster.add(worker_pb2.DECODE, flap_health_s=0.1)
        outcomes = {}
        try:
            for name, worker in (("refusing", refusing), ("dying", dying)):
                try:
                    await _generate(worker.address, [1] * 20, 50)
                    outcomes[name] = "ok"
                except grpc.aio.AioRpcError as error:
                    outcomes[name] = error_from_rpc(error).code_name
            await _generate(hanging.address, [1] * 20, 3)  # the first request is served
            try:
                await asyncio.wait_for(_generate(hanging.address, [2] * 20, 3), 0.5)
                outcomes["hanging"] = "answered"
            except asyncio.TimeoutError:
                outcomes["hanging"] = "hung"
            async with grpc.aio.insecure_channel(flapping.address) as channel:
                seen = set()
                for _ in range(12):
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                    seen.add(reply.status)
                    await asyncio.sleep(0.03)
            outcomes["flapping"] = len(seen)
            outcomes["dead"] = dying.dead
        finally:
            await cluster.stop()
        return outcomes
    outcomes = asyncio.run(scenario())
    assert outcomes["refusing"] == "OVERLOADED"
    assert outcomes["dying"] != "ok" and outcomes["dead"]
    assert outcomes["hanging"] == "hung"
    assert outcomes["flapping"] == 2


def test_timing_model_prefill_is_quadratic_and_cached_prefixes_are_faster():
    timing = SimTiming(prefill_base_s=0.0, prefill_token_s=1e-4, prefill_attention_s=1e-7)
    assert timing.prefill_s(2000, 0) > 2 * timing.prefill_s(1000, 0)
    assert timing.prefill_s(100, 1900) < timing.prefill_s(2000, 0) / 5
    assert timing.step_s(64, 10_000) > timing.step_s(1, 100)
    assert timing.transfer_s(20_000_000_000) == pytest.approx(1.0005)

    async def scenario():
        slow = SimTiming(prefill_base_s=0.0, prefill_token_s=2e-4, decode_step_s=0.0)
        cluster = await SimCluster(SimConfig(sim_decodes=1), slow).start()
        try:
            prompt = list(range(1000))
            first = time.monotonic()
            await _generate(cluster.decodes[0].address, prompt, 1, "cold")
            second = time.monotonic()
            await _generate(cluster.decodes[0].address, prompt, 1, "warm")
            return second - first, time.monotonic() - second
        finally:
            await cluster.stop()
    cold, warm = asyncio.run(scenario())
    assert cold > 0.2 and warm < cold / 3


def test_a_request_whose_prefix_is_prefilling_waits_for_it_then_hits_bounded_by_its_deadline():
    slow = SimTiming(prefill_base_s=0, prefill_token_s=1e-3, prefill_attention_s=0, decode_step_s=0.001,
                     decode_seq_s=0, decode_ctx_token_s=0, transfer_base_s=0)

    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=1, sim_block_size=16), slow).start()
        worker = cluster.decodes[0]
        address = worker.address
        try:
            prefix = list(range(1000, 1400))                     # 25 pages: a 0.4 s prefill
            first = asyncio.ensure_future(_generate(address, prefix + [1] * 8, 2, "a"))
            while not worker.running_tokens:                     # the first one is prefilling
                await asyncio.sleep(0.005)
            second = asyncio.ensure_future(_generate(address, prefix + [2] * 8, 2, "b"))
            other = asyncio.ensure_future(_generate(address, list(range(5000, 5040)), 2, "c"))
            while worker.waiting != 1:                            # the second waits, counted as queued
                await asyncio.sleep(0.005)
            (_, other_usage), (_, usage_b) = await other, await second
            _, usage_a = await first
            async with grpc.aio.insecure_channel(address) as channel:  # a deadline shorter than the prefill
                long = asyncio.ensure_future(_generate(address, list(range(7000, 7400)), 2, "d"))
                while not worker.running_tokens:
                    await asyncio.sleep(0.005)
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in worker_pb2_grpc.DecodeStub(channel).Generate(worker_pb2.DecodeRequest(
                            request_id="e", prompt_token_ids=list(range(7000, 7400)) + [3], timeout_ms=100,
                            params=common_pb2.SamplingParams(max_tokens=2)), timeout=10):
                        pass
                waited = time.monotonic() - started
                await long
            worker.kv.check_integrity()
            return usage_a, usage_b, other_usage, error_from_rpc(refused.value).code, waited, worker.waiting
        finally:
            await cluster.stop()
    usage_a, usage_b, other_usage, code, waited, waiting = asyncio.run(scenario())
    assert usage_a.cached_tokens == 0 and usage_b.cached_tokens == 400  # the second hit what the first computed
    assert other_usage.cached_tokens == 0                               # an unrelated prompt did not wait
    assert code == ErrorCode.DEADLINE_EXCEEDED and waited < 0.3 and waiting == 0

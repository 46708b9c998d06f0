"""The real router core in front of many simulated workers (services/sim) in one process:
its KV-event index equals the workers' real cache state after random traffic with
evictions; two replicas fed the same events route alike (and, without events, do not);
a router started after the workers are warm routes to the warm one at once; and with 200
workers, killing 50 at once loses no request and no streamed token."""
import asyncio
import dataclasses
import random
import time

from baton.protos.baton.v1 import common_pb2
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.types import Role, RouterRequest
from baton.services.sim.cluster import SimCluster
from baton.services.sim.config import SimConfig, SimTiming
from baton.services.sim.tokens import expected_tokens

QUICK = SimTiming(prefill_base_s=0.0005, prefill_token_s=2e-6, prefill_attention_s=0, decode_step_s=0.004,
                  decode_seq_s=0, decode_ctx_token_s=0, transfer_base_s=0)


async def start_core(cluster: SimCluster, **flags) -> RouterCore:
    config = dict(decode=",".join(cluster.addresses()["decode"]), decode_policy="cache_aware",
                  decode_only_threshold=10 ** 6, health_interval_s=0.5, health_timeout_s=2.0)
    core = RouterCore(RouterConfig(**{**config, **flags}))
    await core.start()
    await core.registry.wait_first_check(10)
    if core.kv_events is not None:
        await core.kv_events.wait_ready(10)
    return core


async def generate(core: RouterCore, rid: str, prompt: list[int], max_tokens: int, started=None):
    tokens, usage = [], None
    async for chunk in core.generate(RouterRequest(rid, prompt, common_pb2.SamplingParams(max_tokens=max_tokens),
                                                   timeout_s=60)):
        if started is not None and not tokens:
            started.add(rid)
        tokens += chunk.token_ids
        usage = chunk.usage or usage
    return tokens, usage


def groups(seed: int, count: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(32000) for _ in range(length)] for _ in range(count)]


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_index_equals_the_workers_cache_state_after_random_traffic_with_evictions():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=6, sim_blocks=48, sim_block_size=8), QUICK).start()
        core = await start_core(cluster)
        rng = random.Random(1)
        stems = groups(2, 12, 120)

        async def one(i):
            prompt = rng.choice(stems)[:rng.randrange(16, 120)] + [rng.randrange(32000) for _ in range(8)]
            tokens, _ = await generate(core, f"r{i}", prompt, 6)
            assert tokens == expected_tokens(prompt, 6)
        for wave in range(6):
            await asyncio.gather(*(one(wave * 20 + i) for i in range(20)))
        await until(lambda: all(core.kv_index.blocks_of(w.address) == w.kv.cached_hashes() for w in cluster.decodes))
        evicted = sum(w.kv.evicted_blocks for w in cluster.decodes)
        sources = {row["prefix_source"] for row in core.worker_statuses()}
        await core.stop()
        await cluster.stop()
        return evicted, sources
    evicted, sources = asyncio.run(scenario())
    assert evicted > 50 and sources == {"kv_events"}


def test_two_replicas_fed_the_same_events_route_alike():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=8), QUICK).start()
        precise = [await start_core(cluster), await start_core(cluster)]
        approximate = [await start_core(cluster, kv_events=False), await start_core(cluster, kv_events=False)]
        stems = groups(3, 10, 256)
        for i, stem in enumerate(stems):  # traffic through the first replica of each pair only
            await generate(precise[0], f"p{i}", stem + [i], 4)
            await generate(approximate[0], f"a{i}", stem + [i + 1], 4)
        await until(lambda: all(precise[1].kv_index.blocks_of(w.address) == w.kv.cached_hashes()
                                for w in cluster.decodes))
        for core in precise + approximate:
            await core.registry.check_all()  # the same (idle) load reports on every replica
        probes = [stem + [7, 7, 7] for stem in stems]

        def decisions(core):
            workers = [e.view() for e in core.registry.candidates(Role.DECODE)]
            return [core.decode_policy.select(workers, p).address for p in probes]
        result = [decisions(core) for core in precise + approximate]
        for core in precise + approximate:
            await core.stop()
        await cluster.stop()
        return result
    a, b, c, d = asyncio.run(scenario())
    assert a == b and len(set(a)) > 1
    assert c != d  # without events the second replica knows nothing of the first one's traffic


def test_a_router_restarted_mid_traffic_routes_to_the_warm_worker_at_once():
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=8), QUICK).start()
        core = await start_core(cluster)
        stems = groups(4, 8, 512)
        await asyncio.gather(*(generate(core, f"warm{i}", stem, 4) for i, stem in enumerate(stems)))
        homes = {i: next(w for w in cluster.decodes if w.kv.matched_tokens(stem) >= 512)
                 for i, stem in enumerate(stems)}
        running = asyncio.gather(*(generate(core, f"mid{i}", stem + [9] * 64, 200) for i, stem in enumerate(stems)),
                                 return_exceptions=True)
        await asyncio.sleep(0.1)
        await core.stop()  # the router goes away with streams running
        await running
        fresh = await start_core(cluster)
        cached, chosen = [], []
        for i, stem in enumerate(stems):
            before = {w.address: w.admitted for w in cluster.decodes}
            _, usage = await generate(fresh, f"after{i}", stem + [5], 4)
            cached.append(usage.cached_tokens)
            chosen.append([w.address for w in cluster.decodes if w.admitted > before[w.address]])
        await fresh.stop()
        await cluster.stop()
        return cached, [[homes[i].address] for i in range(len(stems))], chosen
    cached, homes, chosen = asyncio.run(scenario())
    assert chosen == homes  # each first request after the restart went to the worker holding its prefix
    assert cached == [512] * 8  # every first request after the restart found its prefix cached


def test_killing_50_of_200_workers_loses_no_request_and_no_token():
    async def scenario():
        started_at = time.monotonic()
        # 60 tokens at 20 ms a step: every stream still runs when the victims die
        cluster = await SimCluster(SimConfig(sim_decodes=200, sim_blocks=256),
                                   dataclasses.replace(QUICK, decode_step_s=0.02)).start()
        core = await start_core(cluster, decode_policy="min_load", health_interval_s=1.0, max_attempts=5,
                                retry_backoff_s=0.02)
        setup_s = time.monotonic() - started_at
        rng = random.Random(7)
        prompts = {f"q{i}": [rng.randrange(32000) for _ in range(rng.randrange(20, 200))] for i in range(400)}
        started: set[str] = set()
        first = {rid: asyncio.ensure_future(generate(core, rid, prompts[rid], 60, started))
                 for rid in list(prompts)[:300]}
        await until(lambda: len(started) >= 250)
        late = {rid: asyncio.ensure_future(generate(core, rid, prompts[rid], 60, started))
                for rid in list(prompts)[300:]}
        await asyncio.sleep(0)  # the late ones are dispatched, none has a token yet
        victims = rng.sample(cluster.decodes, 50)
        busy = sum(1 for w in victims if w.running)
        await asyncio.gather(*(w.kill() for w in victims))
        results = {rid: await task for rid, task in {**first, **late}.items()}
        migrations = core.metrics.migrations._value.get()
        await core.stop()
        await cluster.stop()
        return prompts, results, migrations, busy, setup_s, time.monotonic() - started_at
    prompts, results, migrations, busy, setup_s, total_s = asyncio.run(scenario())
    for rid, (tokens, usage) in results.items():
        assert tokens == expected_tokens(prompts[rid], 60), rid  # nothing lost, nothing repeated
        assert usage.completion_tokens == 60
    assert busy >= 40 and migrations >= 40
    assert total_s < 30, (setup_s, total_s)


def test_replicas_share_the_queue_limit_and_a_killed_replica_loses_only_its_own_streams():
    from baton.router.main import start_grpc

    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=4), QUICK).start()
        peer = await start_core(cluster)
        server, port, health_task = await start_grpc(peer, "127.0.0.1", 0)
        await asyncio.sleep(0.6)  # the peer's gRPC health turns SERVING (it has healthy workers)
        core = await start_core(cluster, router_peers=f"127.0.0.1:{port}", max_queued_requests=101)
        await core.replicas.check()
        shares = [core.room.limit]
        stems = groups(5, 10, 64)
        mine = [asyncio.ensure_future(generate(core, f"mine{i}", s, 100)) for i, s in enumerate(stems)]
        theirs = [asyncio.ensure_future(generate(peer, f"theirs{i}", s, 100)) for i, s in enumerate(stems)]
        await asyncio.sleep(0.15)
        health_task.cancel()
        await server.stop(0)
        await peer.stop()  # the peer replica dies with its streams running
        lost = await asyncio.gather(*theirs, return_exceptions=True)
        kept = await asyncio.gather(*mine)
        await core.replicas.check()
        shares.append(core.room.limit)
        await core.stop()
        await cluster.stop()
        return shares, stems, lost, kept
    shares, stems, lost, kept = asyncio.run(scenario())
    assert shares == [51, 101]  # ceil(101 / 2) while the peer serves, the whole limit once it is gone
    assert all(tokens == expected_tokens(stem, 100) for (tokens, _), stem in zip(kept, stems))
    assert all(isinstance(r, BaseException) or len(r[0]) < 100 for r in lost)


def test_a_real_engine_worker_publishes_kv_events_the_router_scores_with(tiny_model, tmp_path):
    """A real `baton serve decode` (tiny random-weight model): its radix cache's events reach the
    router's index, which predicts exactly the cached tokens the engine then reports."""
    from tests.helpers.workers import start_worker
    worker = start_worker("decode", tiny_model("llama"), tmp_path)

    async def scenario():
        core = RouterCore(RouterConfig(decode=worker.address, decode_policy="cache_aware",
                                       decode_only_threshold=10 ** 6, health_interval_s=0.2))
        await core.start()
        await core.registry.wait_first_check(10)
        await core.kv_events.wait_ready(10)
        rng = random.Random(8)
        prompt = [rng.randrange(3, 200) for _ in range(37)]
        tokens, _ = await generate(core, "first", prompt, 8)
        follow_up = prompt + tokens + [rng.randrange(3, 200) for _ in range(9)]
        await until(lambda: core.kv_index.matched_tokens(follow_up, [worker.address])[worker.address] > 0)
        predicted = core.kv_index.matched_tokens(follow_up, [worker.address])[worker.address]
        _, usage = await generate(core, "second", follow_up, 4)
        source = core.worker_statuses()[0]["prefix_source"]
        await core.registry.check_all()
        recent_ttft_ms = core.registry.workers[worker.address].load.recent_ttft_ms
        await core.stop()
        return predicted, usage.cached_tokens, source, recent_ttft_ms
    try:
        predicted, cached, source, recent_ttft_ms = asyncio.run(scenario())
    finally:
        worker.stop()
    assert source == "kv_events" and recent_ttft_ms > 0  # its load report carries a recent TTFT too
    assert predicted == cached >= 36  # the index knew exactly the pages the engine then served from cache


def test_a_restarted_worker_is_reindexed_and_a_worker_without_events_stays_approximate():
    from baton.protos.baton.v1 import worker_pb2

    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=2), QUICK).start()
        legacy = await cluster.add(worker_pb2.DECODE, sim_kv_events=False)  # like an older worker
        cluster.decodes.remove(legacy)  # not in the router's flags: added by hand below
        core = await start_core(cluster)
        stem = groups(6, 1, 256)[0]
        await generate(core, "warm", stem, 4)
        core.registry.add(legacy.address, Role.DECODE)
        core.kv_events.sync()
        await core.kv_events.wait_ready(5)
        warm = next(w for w in cluster.decodes if w.kv.matched_tokens(stem))
        before = core.kv_index.matched_tokens(stem, [warm.address])[warm.address]
        fresh = await cluster.restart(warm)  # same port, new epoch, empty cache
        await until(lambda: core.kv_events.source(fresh.address) == "kv_events"
                    and core.kv_index.blocks_of(fresh.address) == fresh.kv.cached_hashes())
        after = core.kv_index.matched_tokens(stem, [fresh.address])[fresh.address]
        sources = {row["address"]: row["prefix_source"] for row in core.worker_statuses()}
        await core.stop()
        await legacy.stop()
        await cluster.stop()
        return before, after, sources[legacy.address], sources[fresh.address]
    before, after, legacy_source, fresh_source = asyncio.run(scenario())
    assert (before, after) == (256, 0)
    assert (legacy_source, fresh_source) == ("approximate", "kv_events")


def test_a_prompt_sent_while_its_prefix_prefills_follows_it_and_hits():
    """The router counts the pages it just dispatched as pending on that worker (its events
    store them only after the prefill), so a second prompt with the same long prefix, sent
    while the first is prefilling, goes to the same worker, which waits for that prefill and
    hits. Without pending blocks (ttl 0) the second one goes elsewhere and computes it all."""
    slow = SimTiming(prefill_base_s=0.0005, prefill_token_s=1e-3, prefill_attention_s=0, decode_step_s=0.004,
                     decode_seq_s=0, decode_ctx_token_s=0, transfer_base_s=0)

    async def scenario():
        cluster = await SimCluster(SimConfig(sim_decodes=4), slow).start()
        outcomes = []
        for ttl, stem in zip((5.0, 0.0), groups(9, 2, 512)):  # 32 pages: a 0.5 s prefill
            core = await start_core(cluster, kv_pending_ttl_s=ttl)
            first = asyncio.ensure_future(generate(core, f"a{ttl}", stem + [1] * 8, 2))
            await until(lambda: any(w.running_tokens for w in cluster.decodes))
            home = next(w for w in cluster.decodes if w.running_tokens)
            pending = {row["address"]: row["pending_kv_blocks"] for row in core.worker_statuses()}
            admitted = {w.address: w.admitted for w in cluster.decodes}
            _, usage = await generate(core, f"b{ttl}", stem + [2] * 8, 2)
            chosen = [w.address for w in cluster.decodes if w.admitted > admitted[w.address]]
            await first
            await until(lambda: core.kv_index.pending_blocks(home.address) == 0)  # its events confirmed them
            outcomes.append((chosen == [home.address], usage.cached_tokens, pending[home.address],
                             core.kv_index.pending_confirmed))
            await core.stop()
        await cluster.stop()
        return outcomes
    with_pending, without = asyncio.run(scenario())
    assert with_pending == (True, 512, 32, 32)
    assert without == (False, 0, 0, 0)

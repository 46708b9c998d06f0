"""KV events of the real engine's radix cache: its event sink hook, the worker shell's
publisher and `KVEvents.Subscribe` over real gRPC, and the router's subscriber and index.
After random inserts, matches and evictions (and a reset), the router's index holds exactly
the chain hashes of the pages in the radix tree; a subscriber arriving late gets them as a
snapshot."""
import asyncio
import random

from baton.protos.baton.v1 import worker_pb2_grpc
from baton.protos.block_hash import block_hashes
from baton.router.config import RouterConfig
from baton.router.kv_events import EVENTS, KVEventSubscriber
from baton.router.kv_index import KVIndex
from baton.router.registry import WorkerRegistry
from baton.router.types import Role
from baton.services.common.server import ServerConfig, ServiceServer
from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.kv.radix_cache import RadixCache
from baton.services.worker.kv_events import KVEventPublisher, KVEventsServicer, attach_to_engine

PAGE = 4


def tree_hashes(cache: RadixCache) -> set[int]:
    """The chain hash of every page the radix tree holds, computed from its nodes."""
    hashes, stack = set(), list(cache.root.children.values())
    while stack:
        node = stack.pop()
        hashes |= set(block_hashes(cache._path(node), PAGE))
        stack.extend(node.children.values())
    return hashes


def insert_request(cache: RadixCache, tokens: list[int]) -> int:
    """What a finished request does (evicting for room); returns the blocks evicted."""
    need, evicted = len(tokens) // PAGE, 0
    if cache.pool.num_free < need:
        evicted = cache.evict(need - cache.pool.num_free)
    if cache.pool.num_free < need:
        return evicted
    blocks = cache.pool.allocate(need)
    cache.insert(tokens, blocks)
    cache.pool.release(blocks)
    return evicted


async def _until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_router_index_mirrors_the_engine_radix_tree_through_kv_events():
    async def scenario():
        loop = asyncio.get_running_loop()
        cache = RadixCache(BlockPool(48), PAGE)
        publisher = KVEventPublisher(PAGE, loop, worker_id="w", epoch=7)

        class Engine:
            pass
        engine = Engine()
        engine.cache = cache
        assert attach_to_engine(engine, publisher)
        server = ServiceServer(ServerConfig(metrics_port=-1))
        server.add_servicer(worker_pb2_grpc.add_KVEventsServicer_to_server, KVEventsServicer(publisher))
        await server.start()
        rng = random.Random(5)
        stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 24))] for _ in range(8)]

        evictions = [0]

        def traffic(steps):
            for _ in range(steps):
                tokens = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randrange(0, 30))]
                cache.match_prefix(tokens)
                evictions[0] += insert_request(cache, tokens)

        traffic(60)  # before anyone subscribes: the late subscriber needs the snapshot
        registry = WorkerRegistry(RouterConfig())
        registry.add(server.address, Role.DECODE)
        index = KVIndex()
        subscriber = KVEventSubscriber(registry, index)
        subscriber.start()
        await subscriber.wait_ready(5)
        results = [(subscriber.source(server.address), index.blocks_of(server.address) == tree_hashes(cache))]
        for _ in range(5):
            traffic(80)
            await _until(lambda: index.blocks_of(server.address) == tree_hashes(cache))
            cache.check_integrity()
        cache.reset()
        await _until(lambda: not index.blocks_of(server.address))
        results.append(publisher.num_blocks)
        await subscriber.stop()
        await registry.stop()
        await server.stop(0)
        return results, evictions[0]
    (first, empty_after_reset), evictions = asyncio.run(scenario())
    assert first == (EVENTS, True)
    assert empty_after_reset == 0 and evictions > 0


def test_a_stored_page_is_named_like_the_router_names_a_prompts_page():
    loop = asyncio.new_event_loop()
    try:
        publisher = KVEventPublisher(PAGE, loop)
        publisher.stored(list(range(8)), list(range(8, 16)))
        assert publisher.block_set() == set(block_hashes(list(range(16)), PAGE)[2:])
        publisher.removed(list(range(8)), list(range(8, 12)))
        assert publisher.block_set() == {block_hashes(list(range(16)), PAGE)[3]}
    finally:
        loop.close()


def test_closing_the_publisher_ends_every_subscription_and_refuses_new_ones():
    async def scenario():
        publisher = KVEventPublisher(PAGE, asyncio.get_running_loop())
        publisher.stored_hashes(0, [11, 12])
        received = []

        async def subscriber():
            async for batch in publisher.subscribe():
                received.append(batch)
        task = asyncio.create_task(subscriber())
        await asyncio.sleep(0.01)
        publisher.close()
        await asyncio.wait_for(task, 2)  # it ended instead of waiting for batches that never come
        late = [batch async for batch in publisher.subscribe()]
        return received, late
    received, late = asyncio.run(scenario())
    assert len(received) == 1 and received[0].snapshot
    assert late == []

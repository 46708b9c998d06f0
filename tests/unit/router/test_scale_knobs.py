"""Router knobs for large clusters: --health-check-interval (SGLang's name for
--health-interval-s), --max-unhealthy-workers (NOT_SERVING once too many workers are
down), the weighted policy's weights and the cache-aware thresholds from the config, and
each replica's share of the cluster-wide queue limit."""
import asyncio

import pytest

from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.replicas import ReplicaSet
from baton.router.types import Role


def test_health_check_interval_is_an_alias_that_wins():
    assert RouterConfig(health_check_interval=0.25).health_interval_s == 0.25
    assert RouterConfig(health_interval_s=3.0).health_interval_s == 3.0
    with pytest.raises(ValueError, match="max_unhealthy_workers"):
        RouterConfig(max_unhealthy_workers=-2)


def test_max_unhealthy_workers_turns_the_router_not_serving():
    async def scenario():
        core = RouterCore(RouterConfig(decode="a:1,b:1,c:1", prefill="p:1", max_unhealthy_workers=1))
        entries = core.registry.workers
        seen = []
        for healthy in ({"a:1", "b:1", "c:1", "p:1"}, {"a:1", "b:1", "c:1"}, {"a:1", "b:1"}, set()):
            for address, entry in entries.items():
                entry.healthy = address in healthy
            seen.append(core.is_serving())
        unlimited = RouterCore(RouterConfig(decode="a:1,b:1"))
        unlimited.registry.workers["a:1"].healthy = True
        seen.append(unlimited.is_serving())
        await core.registry.stop()
        await unlimited.registry.stop()
        return seen
    assert asyncio.run(scenario()) == [True, True, False, False, True]


def test_policies_get_their_parameters_from_the_config():
    async def scenario():
        core = RouterCore(RouterConfig(decode="a:1", decode_policy="weighted", worker_weights="a:1=4",
                                       prefill_policy="cache_aware", balance_abs_threshold=9000,
                                       cache_threshold=0.25))
        await core.registry.stop()
        return core
    core = asyncio.run(scenario())
    assert core.decode_policy.weight("a:1") == 4 and core.decode_policy.weight("b:1") == 1
    assert core.prefill_policy.balance_abs_threshold == 9000 and core.prefill_policy.cache_threshold == 0.25
    assert core.prefill_policy.index is core.kv_index and core.registry.workers["a:1"].role is Role.DECODE
    with pytest.raises(ValueError, match="weight"):
        RouterCore(RouterConfig(decode_policy="weighted", worker_weights="a:1=-1"))


def test_a_replicas_share_of_a_cluster_wide_limit():
    assert [ReplicaSet.share(1024, n) for n in (1, 2, 3, 4)] == [1024, 512, 342, 256]
    assert ReplicaSet.share(1, 8) == 1

"""Conditional disaggregation: while the prefill tier is backed up (its load report holds more
prompt tokens than `prefill_backlog_limit`), the router prefills requests on their decode worker
instead of queueing them behind the others; with the limit off, every long prompt goes through
the prefill worker. Real router core, simulated workers (services/sim) with a slow prefill that
runs one request at a time; every stream still equals the workers' deterministic tokens. The
backlog is the larger of the last load report and the router's own count of prompt tokens sent
to the prefill worker and not yet answered with a first token."""
import asyncio

from baton.protos.baton.v1 import common_pb2, worker_pb2
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.types import RouterRequest
from baton.services.sim.cluster import SimCluster
from baton.services.sim.config import SimConfig, SimTiming
from baton.services.sim.tokens import expected_tokens
from tests.integration.test_router_scale import groups

SLOW_PREFILL = SimTiming(prefill_base_s=0.0, prefill_token_s=0.002, prefill_attention_s=0, decode_step_s=0.002,
                         decode_seq_s=0, decode_ctx_token_s=0, transfer_base_s=0)


def _paths(core: RouterCore) -> dict[str, float]:
    return {path: core.metrics.paths.labels(path=path)._value.get() for path in ("disaggregated", "decode_only")}


def _run(limit: int, health_interval_s: float = 0.1, spacing_s: float = 0.05) -> dict[str, float]:
    async def scenario():
        cluster = await SimCluster(SimConfig(sim_prefills=0, sim_decodes=1), SLOW_PREFILL).start()
        await cluster.add(worker_pb2.PREFILL, sim_max_running=1)  # prefills one prompt at a time: a queue forms
        addresses = cluster.addresses()
        core = RouterCore(RouterConfig(prefill=",".join(addresses["prefill"]), decode=",".join(addresses["decode"]),
                                       decode_only_threshold=10, prefill_backlog_limit=limit,
                                       health_interval_s=health_interval_s))
        await core.start()
        await core.registry.wait_first_check(10)
        prompts = groups(4, 16, 150)

        async def one(i: int, prompt: list[int]) -> None:
            await asyncio.sleep(spacing_s * i)  # arrivals spread over the first prefills, so load reports see the queue
            tokens = []
            async for chunk in core.generate(RouterRequest(f"r{i}", prompt, common_pb2.SamplingParams(max_tokens=4),
                                                           timeout_s=60)):
                tokens += chunk.token_ids
            assert tokens == expected_tokens(prompt, 4)
        try:
            await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            return _paths(core)
        finally:
            await core.stop()
            await cluster.stop()
    return asyncio.run(scenario())


def test_a_backed_up_prefill_worker_sends_requests_decode_only():
    paths = _run(limit=400)
    assert paths["disaggregated"] >= 1 and paths["decode_only"] >= 4, paths
    assert paths["disaggregated"] + paths["decode_only"] == 16


def test_without_the_limit_every_long_prompt_is_disaggregated():
    assert _run(limit=0) == {"disaggregated": 16, "decode_only": 0}


def test_the_routers_own_count_sees_a_burst_between_load_reports():
    """One load report (at start, empty) and then none for 30 s: a burst of 16 long prompts is
    still spread, because the router counts the prompt tokens it has sent to the prefill worker
    and not yet seen a first token for."""
    paths = _run(limit=400, health_interval_s=30, spacing_s=0.0)
    assert paths["disaggregated"] >= 1 and paths["decode_only"] >= 8, paths

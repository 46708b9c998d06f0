"""DNS worker discovery (router/discovery.py) in a real router core in front of real decode
worker processes. The resolver is the injected fault: it answers the headless-Service name with
real local worker addresses that change over time, as Kubernetes DNS does while pods come and
go. A worker that appears gets work; a pod restarted with a new IP is picked up and the stale
address dropped (with its gauges); a DNS timeout changes nothing; a vanished name drops its
workers, but only once the streams the router sent them have ended; flag-given workers stay."""
import asyncio

import pytest

from baton.protos.baton.v1 import common_pb2
from baton.router.config import RouterConfig
from baton.router.core import RouterCore
from baton.router.discovery import NameNotFound, WorkerDiscovery, format_address, resolve_dns, split_target
from baton.router.types import RouterRequest, Role
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.workers import start_worker, stop_all, wait_all_serving

NAME = "baton-decode.default.svc.cluster.local"


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("discovery")
    model = make_tiny_model("llama", tmp / "model")
    started = wait_all_serving([start_worker("decode", model, tmp, wait=False) for _ in range(2)])
    yield [w.address for w in started]
    stop_all(started)


class FakeDns:
    """The resolver: what the name resolves to now (a list, or an exception to raise)."""

    def __init__(self) -> None:
        self.answer: object = NameNotFound(NAME)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return list(self.answer)


async def generate(core: RouterCore, max_tokens: int, i: int) -> list[int]:
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = RouterRequest(f"discovery-{i}", [5, 6, 7, 8, 9], params, timeout_s=60)
    return [t async for chunk in core.generate(request) for t in chunk.token_ids]


def served_by(core: RouterCore) -> dict[str, float]:
    return {s.labels["worker"]: s.value for m in core.metrics.decisions.collect() for s in m.samples
            if s.name.endswith("_total")}


def test_workers_follow_what_the_name_resolves_to(workers):
    async def scenario():
        core = RouterCore(RouterConfig(health_interval_s=0.2, health_timeout_s=1.0, decode_only_threshold=10_000))
        await core.start()
        dns, removed = FakeDns(), []

        def on_removed(address: str, role: Role) -> None:
            removed.append((address, role))
            core.metrics.forget_worker(address, role)  # what `baton router` wires
        discovery = WorkerDiscovery(core.registry, [(f"{NAME}:50051", Role.DECODE)], 0.1, dns, on_removed)
        try:
            await discovery.refresh()
            assert core.registry.workers == {} and not core.is_serving() and dns.asked == [(NAME, 50051)]

            dns.answer = [workers[0]]  # the first pod is ready
            await discovery.refresh()
            assert list(core.registry.workers) == [workers[0]] and core.is_serving()
            assert len(await generate(core, 4, 0)) == 4 and served_by(core) == {workers[0]: 1}
            await core.refresh_worker_loads()

            dns.answer = [workers[1]]  # the pod restarted with a new IP
            await discovery.refresh()
            assert list(core.registry.workers) == [workers[1]] and removed == [(workers[0], Role.DECODE)]
            assert workers[0] not in {s.labels["worker"] for m in core.metrics.worker_healthy.collect()
                                      for s in m.samples}
            assert len(await generate(core, 4, 1)) == 4 and served_by(core)[workers[1]] == 1

            dns.answer = OSError("DNS timeout")  # a flaky resolver keeps what we have
            await discovery.refresh()
            assert list(core.registry.workers) == [workers[1]] and core.is_serving()

            stream = asyncio.create_task(generate(core, 300, 2))  # long enough to outlive a look-up
            while core.registry.workers[workers[1]].in_flight == 0:
                await asyncio.sleep(0.01)
            dns.answer = NameNotFound(NAME)  # no ready pod behind the Service any more
            await discovery.refresh()
            assert workers[1] in core.registry.workers, "dropped while our stream still ran there"
            assert len(await stream) == 300
            await discovery.refresh()
            assert core.registry.workers == {} and not core.is_serving()
        finally:
            await core.stop()
    asyncio.run(scenario())


def test_flag_workers_stay_and_the_background_loop_adds_workers(workers):
    async def scenario():
        core = RouterCore(RouterConfig(decode=workers[0], health_interval_s=0.2, health_timeout_s=1.0))
        await core.start()
        dns = FakeDns()
        discovery = WorkerDiscovery(core.registry, [(f"{NAME}:50051", Role.DECODE)], 0.05, dns)
        discovery.start()
        try:
            dns.answer = [workers[0], workers[1]]
            while len(core.registry.workers) < 2:
                await asyncio.sleep(0.05)
            dns.answer = []
            while workers[1] in core.registry.workers:
                await asyncio.sleep(0.05)
            assert list(core.registry.workers) == [workers[0]]  # given as a flag: never dropped
            assert len(dns.asked) >= 2
        finally:
            await discovery.stop()
            await core.stop()
    asyncio.run(scenario())


def test_the_system_resolver_and_address_forms():
    assert asyncio.run(resolve_dns("localhost", 50051))[0] in ("127.0.0.1:50051", "[::1]:50051")
    assert format_address("fd00::5", 50051) == "[fd00::5]:50051"
    assert split_target("baton-decode.ns.svc:50051") == ("baton-decode.ns.svc", 50051)
    with pytest.raises(ValueError, match="host:port"):
        split_target("baton-decode")

"""`baton up --ray` settings without a Ray cluster (tests/e2e/test_ray.py runs one): the --ray-*
flags come from `RayConfig` and are validated; each worker actor's GPUs and engine settings follow
the cluster (0 GPUs and the CPU on a CPU cluster, a fraction of a GPU scales the memory share);
the router follows Ray actors or DNS names, never both, and its Ray discovery looks for the
launcher's actor names."""
import pytest

from baton.deploy.cli import build_parser
from baton.deploy.launcher import UpConfig
from baton.deploy.ray_launcher import RayCluster, RayConfig
from baton.router.config import RouterConfig
from baton.router.discovery import discovery_from_config
from baton.router.registry import WorkerRegistry
from baton.router.types import Role
from baton.services.common.dataclass_flags import from_args
from baton.services.engine.config import EngineConfig


def test_up_flags_build_the_ray_config():
    args = build_parser().parse_args(["up", "--ray", "auto", "--ray-gpus-per-worker", "0.5",
                                      "--ray-namespace", "prod", "--ray-max-restarts", "3"])
    assert from_args(UpConfig, args).ray == "auto"
    assert from_args(RayConfig, args) == RayConfig(ray_namespace="prod", ray_gpus_per_worker=0.5, ray_max_restarts=3)


@pytest.mark.parametrize("bad", [dict(ray_gpus_per_worker=2.0), dict(ray_gpus_per_worker=-1.0),
                                 dict(ray_cpus_per_worker=-1.0), dict(ray_max_restarts=-2),
                                 dict(ray_discovery_interval_s=0.0), dict(ray_namespace="")])
def test_bad_ray_settings_are_refused(bad):
    with pytest.raises(ValueError):
        RayConfig(**bad)


def _options(gpus_in_cluster: float, engine: EngineConfig = EngineConfig(), **ray) -> tuple[float, EngineConfig]:
    return RayCluster(UpConfig(ray="auto", worker_threads=2), engine, RayConfig(**ray)).worker_options(gpus_in_cluster)


def test_worker_actors_follow_the_cluster():
    gpus, engine = _options(0)
    assert gpus == 0 and engine.device == "cpu" and engine.num_threads == 2
    gpus, engine = _options(8)
    assert gpus == 1 and engine.device == "cuda" and engine.mem_fraction_static == EngineConfig().mem_fraction_static
    gpus, engine = _options(8, ray_gpus_per_worker=0.5)  # two workers share a GPU: half the memory each
    assert gpus == 0.5 and engine.mem_fraction_static == round(EngineConfig().mem_fraction_static / 2, 4)
    gpus, engine = _options(8, EngineConfig(device="cpu"))
    assert gpus == 0 and engine.device == "cpu"


def test_router_follows_ray_or_dns_not_both():
    with pytest.raises(ValueError, match="not both"):
        RouterConfig(ray_address="auto", discover_decode="baton-decode.default.svc:50051")


def test_ray_discovery_looks_for_the_launchers_actor_names():
    async def resolver(prefix: str, port: int) -> list[str]:
        return []
    config = RouterConfig(ray_address="auto", ray_actor_prefix="prod", discovery_interval_s=0.5)
    discovery = discovery_from_config(config, WorkerRegistry(config), resolver=resolver)
    assert [(n.host, n.role) for n in discovery.names] == [("prod-prefill", Role.PREFILL), ("prod-decode", Role.DECODE)]
    assert discovery.interval_s == 0.5 and discovery.resolver is resolver

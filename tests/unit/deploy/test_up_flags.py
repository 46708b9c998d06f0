"""`baton up` passes its failover knobs on: the router gets them as flags, workers their drain limit."""
from __future__ import annotations

from baton.deploy.cli import build_parser
from baton.deploy.launcher import Cluster, UpConfig
from baton.router.config import RouterConfig
from baton.services.common.dataclass_flags import from_args
from baton.services.engine.config import EngineConfig


def test_failover_knobs_reach_the_router_flags() -> None:
    args = build_parser().parse_args(["up", "--max-migrations", "5", "--breaker-failures", "7",
                                      "--request-timeout-s", "90", "--health-interval-s", "0.5",
                                      "--breaker-cooldown-s", "2", "--drain-timeout-s", "12"])
    up = from_args(UpConfig, args)
    flags = Cluster(up, EngineConfig())._failover_flags()
    router = from_args(RouterConfig, build_parser().parse_args(["router", *flags]))
    assert (router.max_migrations, router.breaker_failures, router.request_timeout_s, router.health_interval_s,
            router.breaker_cooldown_s) == (5, 7, 90.0, 0.5, 2.0)
    assert up.drain_timeout_s == 12.0
    defaults = from_args(RouterConfig, build_parser().parse_args(["router", *Cluster(UpConfig(), EngineConfig())._failover_flags()]))
    assert defaults == RouterConfig()

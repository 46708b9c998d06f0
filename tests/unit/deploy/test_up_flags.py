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


def test_baton_up_closes_its_cluster_and_passes_keys_by_file(tmp_path) -> None:
    import stat
    from pathlib import Path

    from baton.protos.cluster_auth import read_secret_file
    up = from_args(UpConfig, build_parser().parse_args(["up", "--api-keys", "k1,k2", "--worker-metrics-port", "9300"]))
    cluster = Cluster(up, EngineConfig())
    try:
        secret_flags, key_flags = cluster._secret_flags(), cluster._key_flags()
        assert cluster._secret_flags() == secret_flags  # one secret for the whole cluster
        secret = Path(secret_flags[1])
        assert len(read_secret_file(str(secret))) == 64
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
        assert "k1" not in " ".join(key_flags)  # never on the router's command line
        router = from_args(RouterConfig, build_parser().parse_args(["router", *key_flags, *secret_flags]))
        assert router.api_key_list == ("k1", "k2") and router.cluster_credentials.secret == read_secret_file(str(secret))
        assert up.worker_metrics_port == 9300
    finally:
        cluster.stop()
    assert not secret.exists()  # the run directory goes with the cluster
    assert Cluster(UpConfig(open_cluster=True), EngineConfig())._secret_flags() == []

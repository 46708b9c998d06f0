"""RouterConfig's API keys from a file (a mounted Kubernetes Secret) and its discovery flags."""
import dataclasses

import pytest

from baton.router.config import RouterConfig
from baton.router.discovery import discovery_from_config
from baton.router.registry import WorkerRegistry
from baton.router.types import Role


def test_api_keys_from_a_file_join_the_flag_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\nk2 , k3\n\n")
    config = RouterConfig(api_keys="flag", api_keys_file=str(keys))
    assert config.api_key_list == ("flag", "k1", "k2", "k3")
    assert dataclasses.replace(config, api_keys="").api_key_list == ("k1", "k2", "k3")
    assert RouterConfig().api_key_list == ()
    with pytest.raises(FileNotFoundError):
        RouterConfig(api_keys_file=str(tmp_path / "missing"))


def test_discovery_follows_the_flags():
    assert discovery_from_config(RouterConfig(), WorkerRegistry(RouterConfig())) is None
    config = RouterConfig(discover_decode="baton-decode.ns.svc:50051", discovery_interval_s=2)
    discovery = discovery_from_config(config, WorkerRegistry(config))
    assert [(n.host, n.port, n.role) for n in discovery.names] == [("baton-decode.ns.svc", 50051, Role.DECODE)]
    assert discovery.interval_s == 2
    with pytest.raises(ValueError, match="discovery_interval_s"):
        RouterConfig(discovery_interval_s=0)

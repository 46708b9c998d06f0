"""`--processes N`: each child's config (shared ports fixed, its own ports, the others as peers) and the
flag checks."""
import pytest

from baton.router.config import RouterConfig
from baton.router.processes import child_configs


def test_each_process_gets_its_own_ports_and_the_others_as_peers():
    config = RouterConfig(processes=3, process_ports="9001:9101,9002:9102,9003:9103", router_peers="10.0.0.9:7000")
    children = child_configs(config)
    assert [c.own_ports for c in children] == [(9001, 9101), (9002, 9102), (9003, 9103)]
    assert len({(c.http_port, c.grpc_port) for c in children}) == 1  # one shared pair, picked once
    assert all(c.http_port > 0 and c.grpc_port > 0 and c.processes == 1 for c in children)
    assert RouterConfig().own_ports is None and config.own_ports is None  # a router alone; the parent
    assert children[1].router_peers == "10.0.0.9:7000,127.0.0.1:9101,127.0.0.1:9103"


def test_own_ports_are_picked_distinct_when_not_given():
    children = child_configs(RouterConfig(processes=4, http_port=8000, grpc_port=8001))
    ports = {p for c in children for p in c.own_ports}
    assert len(ports) == 8 and not ports & {8000, 8001}
    assert all((c.http_port, c.grpc_port) == (8000, 8001) for c in children)


@pytest.mark.parametrize("flags, message", [
    (dict(processes=0), "processes must be at least 1"),
    (dict(processes=2, process_ports="9001:9101"), "one HTTP:gRPC pair per process"),
    (dict(processes=1, process_ports="9001-9101"), "is not HTTP:gRPC"),
])
def test_bad_process_flags_are_clear_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**flags)

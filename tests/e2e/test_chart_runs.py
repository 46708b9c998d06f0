"""Run what the Helm chart renders: the CPU value set (k8s/charts/baton/ci/cpu-values.yaml) and
the API-keys set (keys from a Secret, the model from a hostPath; one decode worker here) are each
rendered with Helm's engine and each Deployment's pod started as local processes by
tests/helpers/chart_runner.py (rendered commands, args and env; ports remapped to free loopback
ports; the router finds the workers by resolving their headless Service names, answered by an
injected resolver with the pods' local addresses). Then every probe the chart declares must pass,
the chart's own `helm test` pod must get a chat completion through the router Service, and that
completion must have gone prefill -> KV transfer -> decode (CPU set), the way the chart wires the
workers, or be refused without the Secret's key (API-keys set).
The model emptyDir arrives holding the already converted embedded model (its conversion is the
engine's own tests' business), so the init container's command runs its fast path."""
import re
import urllib.error
import urllib.request

import pytest

from tests.helpers import chart as c
from tests.helpers.chart_runner import ChartRun

pytestmark = pytest.mark.slow


KEY = "chart-test-key"


@pytest.fixture(scope="module", params=["cpu-values", "api-keys-values"])
def cluster(request, default_model_path, tmp_path_factory):
    seed = tmp_path_factory.mktemp("model-cache")
    (seed / "baton" / "models").mkdir(parents=True)
    (seed / "baton" / "models" / default_model_path.name).symlink_to(default_model_path)
    node = tmp_path_factory.mktemp("node-models")
    (node / default_model_path.name).symlink_to(default_model_path)
    override = {"decode": {"replicas": 1, "gpus": 0, "args": ["--num-threads", "1", "--kv-cache-tokens", "4096"]},
                "router": {"replicas": 1}} if request.param == "api-keys-values" else {}
    run = ChartRun(c.objects(c.values_of(request.param, override)), tmp_path_factory.mktemp("pods"), c.NAMESPACE,
                   secrets={"baton-keys": {"keys": f"{KEY}\nother-key"}}, seed_volume=seed,
                   host_paths={"/data/models": node})
    run.value_set = request.param
    try:
        run.start()
        run.wait_started()
        run.wait_ready()
        yield run
    finally:
        run.stop()


def test_every_probe_the_chart_declares_passes(cluster):
    kinds = set()
    for pod in cluster.pods:
        for container in pod.spec["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert kind in container, f"{pod.name} declares no {kind}"
                probe = container[kind]
                kinds |= {k for k in ("grpc", "tcpSocket", "httpGet", "exec") if k in probe}
                assert cluster.probe(pod, container, kind), f"{pod.name}: {kind} {probe} fails\n{pod.log()}"
    expected = {"demo-baton-router", "demo-baton-decode"} | ({"demo-baton-prefill"}
                                                           if cluster.value_set == "cpu-values" else set())
    assert {p.name.rsplit("-", 1)[0] for p in cluster.pods} == expected
    assert "grpc" in kinds


def test_the_helm_test_pod_gets_a_chat_completion_through_prefill_and_decode(cluster):
    results = cluster.run_test_pods()
    assert len(results) == 1
    code, output = results[0]
    assert code == 0 and "baton answered:" in output, output
    router = cluster.local_port("demo-baton-router", 8000)
    if cluster.value_set == "api-keys-values":
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{router}/v1/models", timeout=10)
        assert refused.value.code == 401
        return
    with urllib.request.urlopen(f"http://127.0.0.1:{router}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert re.search(r'baton_router_paths_total\{path="disaggregated"\} [1-9]', metrics), metrics[-2000:]
    decode_metrics = cluster.local_port("demo-baton-decode", 9090)
    with urllib.request.urlopen(f"http://127.0.0.1:{decode_metrics}/metrics", timeout=10) as reply:
        worker = reply.read().decode()
    moved = re.search(r'baton_kv_transfer_bytes_total\{backend="tcp",direction="in",role="decode"\} (\S+)', worker)
    assert moved and float(moved.group(1)) > 0, worker[-2000:]

"""The Helm chart without a cluster: `helm lint --strict` and the chart's values.schema.json
(through Helm's Go SDK), every object of every value set (defaults, CPU only, E/P/D with GPUs,
API keys on, a vision model with encoders) valid against the Kubernetes OpenAPI schemas (kubernetes-validate), a comment on
every value, and what each value set must produce: GPUs and RDMA where asked, gRPC-health probes,
headless Services the router resolves, the monitoring objects carrying the very files in deploy/."""
import json
import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.helpers import chart as c
from tests.helpers.workers import REPO

KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
"""Oldest Kubernetes the chart promises to validate against, and the newest schemas shipped."""
CRDS = {"ServiceMonitor", "PrometheusRule"}
"""Kinds that are custom resources (the Prometheus operator's): checked by shape, not by OpenAPI."""


def test_lint_strict_passes():
    report = helm.lint(c.CHART, strict=True, namespace=c.NAMESPACE)
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("value_set", list(c.VALUE_SETS))
def test_every_object_is_valid_kubernetes(value_set):
    objs = c.objects(c.values_of(value_set))
    assert {"Deployment", "Service", "Pod"} <= {o["kind"] for o in objs}
    for obj in objs:
        if obj["kind"] in CRDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_schema_refuses_bad_values():
    for bad in ({"transfer": {"backend": "rdma"}}, {"router": {"replicas": 0}}, {"decode": {"gpus": -1}},
                {"model": {"source": "s3"}}, {"routr": {}}):
        with pytest.raises(helm.HelmValuesError):
            c.render(bad)
    with pytest.raises(helm.HelmError, match="model.claimName is required"):
        c.render({"model": {"source": "pvc", "path": "m"}})


def test_every_value_has_a_comment():
    lines = (c.CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        key = re.match(r"^\s*([A-Za-z][\w.-]*):\s*(\S.*)?$", line)
        is_group = key and not key.group(2) and i + 1 < len(lines) and lines[i + 1].startswith(" " * (len(line) - len(line.lstrip()) + 2))
        if key and not is_group and not lines[i - 1].lstrip().startswith("#"):
            uncommented.append(line.strip())
    assert not uncommented, uncommented


def test_the_value_names_the_docs_use():
    with helm.Chart.load(c.CHART) as chart:
        values = chart.values
    assert values["router"]["replicas"] == 2 and values["encoder"]["replicas"] == 0
    assert values["prefill"]["replicas"] >= 1 and values["decode"]["replicas"] >= 1
    assert {"source", "path", "hostPath", "claimName", "mountPath", "servedName"} <= set(values["model"])
    assert values["apiKeys"]["enabled"] is False and values["apiKeys"]["secretName"]
    assert values["serviceMonitor"]["enabled"] is False
    docs = (REPO / "docs" / "deploy.md").read_text()
    for name in ("router.replicas", "prefill.replicas", "decode.replicas", "encoder.replicas", "model.source",
                 "apiKeys.enabled", "apiKeys.secretName", "serviceMonitor.enabled"):
        assert f"`{name}" in docs, name


def _container(objs, name):
    return c.by_kind(objs, "Deployment")[f"{c.RELEASE}-baton-{name}"]["spec"]["template"]["spec"]["containers"][0]


def test_defaults_router_behind_a_service_workers_on_gpus_with_grpc_probes():
    objs = c.objects({})
    deployments, services = c.by_kind(objs, "Deployment"), c.by_kind(objs, "Service")
    router = deployments["demo-baton-router"]
    assert router["spec"]["replicas"] == 2 and "resources" not in _container(objs, "router") or \
        "nvidia.com/gpu" not in json.dumps(_container(objs, "router").get("resources", {}))
    assert {p["name"] for p in services["demo-baton-router"]["spec"]["ports"]} == {"http", "grpc"}
    args = _container(objs, "router")["args"]
    assert args[args.index("--discover-decode") + 1] == "demo-baton-decode.serving.svc.cluster.local:50051"
    assert args[args.index("--discover-prefill") + 1] == "demo-baton-prefill.serving.svc.cluster.local:50051"
    for role in ("prefill", "decode"):
        worker = _container(objs, role)
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert worker[probe]["grpc"]["port"] == 50051
        assert services[f"demo-baton-{role}"]["spec"]["clusterIP"] == "None"
        assert worker["args"][worker["args"].index("--transfer") + 1] == "nixl"
    assert "demo-baton-encoder" not in deployments
    assert set(c.by_kind(objs, "PodDisruptionBudget")) == {"demo-baton-router", "demo-baton-prefill", "demo-baton-decode"}
    assert not c.by_kind(objs, "HorizontalPodAutoscaler") and not c.by_kind(objs, "ServiceMonitor")
    assert _container(objs, "router")["image"] == "baton:0.1.0"


def test_gpu_epd_rdma_nixl_and_the_monitoring_objects():
    objs = c.objects(c.values_of("gpu-epd-values"))
    for role in ("prefill", "decode"):
        worker = _container(objs, role)
        assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1, "rdma/rdma_shared_device_a": 1}
        env = {e["name"]: e.get("value") for e in worker["env"]}
        assert env["UCX_NET_DEVICES"] == "mlx5_0:1" and env["NCCL_NVLS_ENABLE"] == "0"
        assert worker["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        pod = c.by_kind(objs, "Deployment")[f"demo-baton-{role}"]["spec"]["template"]["spec"]
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
        assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "models"
    assert c.by_kind(objs, "HorizontalPodAutoscaler")["demo-baton-router"]["spec"]["maxReplicas"] == 6
    assert "replicas" not in c.by_kind(objs, "Deployment")["demo-baton-router"]["spec"]
    monitor = c.by_kind(objs, "ServiceMonitor")["demo-baton"]
    ports = {p["name"] for s in c.by_kind(objs, "Service").values() for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = yaml.safe_load((REPO / "deploy/prometheus/baton-rules.yml").read_text())
    assert c.by_kind(objs, "PrometheusRule")["demo-baton"]["spec"]["groups"] == rules["groups"]
    dashboard = c.by_kind(objs, "ConfigMap")["demo-baton-dashboard"]
    assert json.loads(dashboard["data"]["baton.json"]) == json.loads((REPO / "deploy/grafana/baton.json").read_text())


def test_api_keys_from_the_secret_reach_the_router_and_the_helm_test():
    objs = c.objects(c.values_of("api-keys-values"))
    router = _container(objs, "router")
    assert router["args"][router["args"].index("--api-keys-file") + 1] == "/etc/baton/api-keys/keys"
    pod = c.by_kind(objs, "Deployment")["demo-baton-router"]["spec"]["template"]["spec"]
    assert {"name": "api-keys", "secret": {"secretName": "baton-keys"}} in pod["volumes"]
    test_pod = next(iter(c.by_kind(objs, "Pod").values()))
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "baton-keys", "key": "keys"}
    assert "--discover-prefill" not in router["args"] and "demo-baton-prefill" not in c.by_kind(objs, "Deployment")
    assert "Bearer" in c.notes(c.values_of("api-keys-values"))


def test_vision_epd_encoders_behind_a_headless_service_the_router_discovers():
    objs = c.objects(c.values_of("vision-epd-values"))
    deployments, services = c.by_kind(objs, "Deployment"), c.by_kind(objs, "Service")
    assert deployments["demo-baton-encoder"]["spec"]["replicas"] == 2
    encoder = _container(objs, "encoder")
    args = encoder["args"]
    assert args[:2] == ["serve", "encoder"] and args[args.index("--transfer") + 1] == "nixl"
    assert args[args.index("--model") + 1] == "/models/Qwen2.5-VL-7B-Instruct"
    assert args[args.index("--advertise-host") + 1] == "$(POD_IP)" and "--embedding-cache-bytes" in args
    assert encoder["resources"]["limits"]["nvidia.com/gpu"] == 1 and encoder["readinessProbe"]["grpc"]["port"] == 50051
    assert services["demo-baton-encoder"]["spec"]["clusterIP"] == "None"
    router = _container(objs, "router")["args"]
    assert router[router.index("--discover-encoders") + 1] == "demo-baton-encoder.serving.svc.cluster.local:50051"
    assert "demo-baton-encoder" in c.by_kind(objs, "PodDisruptionBudget")
    assert "--discover-encoders" not in _container(c.objects({}), "router")["args"]

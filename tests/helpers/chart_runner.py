"""Runs what the Helm chart renders as local processes, the way a kubelet would run the pods:
each Deployment's pods (init containers first, then the containers) with the rendered command,
args and env, `$(VAR)` expanded from the container's env, the downward API answered (pod name,
pod IP 127.0.0.1), volumes as temporary folders (a Secret's keys as files), every container port
remapped to a free loopback port (0.0.0.0 binds become 127.0.0.1), a ClusterIP Service's name
(`svc:port`) pointing at its pod, and a headless Service's name resolved by the router through
tests.helpers.fake_dns to its pods' addresses. Probes (grpc, httpGet, tcpSocket, exec) run as
the kubelet runs them. Test pods (`helm.sh/hook: test`) run to completion on demand."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.services.common.server import free_port
from tests.helpers.workers import REPO, stop_processes

LOCAL_IP = "127.0.0.1"


@dataclass
class Pod:
    """One pod of a Deployment (or a test Pod) on this machine."""

    name: str
    spec: dict
    labels: dict
    ports: dict[int, int] = field(default_factory=dict)
    """containerPort -> local port."""
    mounts: dict[str, Path] = field(default_factory=dict)
    """volume name -> local folder."""
    procs: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)

    def log(self) -> str:
        return "\n".join(f"--- {name}\n{path.read_text()[-3000:]}" for name, _, path in self.procs)


class ChartRun:
    """The rendered objects of one release, started locally."""

    def __init__(self, objects: list[dict], folder: Path, namespace: str,
                 secrets: Optional[dict[str, dict[str, str]]] = None, seed_volume: Optional[Path] = None,
                 host_paths: Optional[dict[str, Path]] = None) -> None:
        """`secrets`: Secret name -> {key: value}. `seed_volume`: copied into the emptyDir that backs
        the model (an already converted model cache, as on a node that ran the pod before).
        `host_paths`: a node folder (hostPath volume) -> the local folder standing for it."""
        self.objects, self.folder, self.namespace = objects, folder, namespace
        self.secrets, self.host_paths = secrets or {}, host_paths or {}
        self.seed_volume = seed_volume
        self.answers = folder / "dns.json"
        self.pods: list[Pod] = []
        self.services = [o for o in objects if o["kind"] == "Service"]

    # --- start-up --------------------------------------------------------------------
    def start(self) -> None:
        """Create every Deployment's pods (ports first, so names resolve), then start them."""
        for deployment in (o for o in self.objects if o["kind"] == "Deployment"):
            template = deployment["spec"]["template"]
            for i in range(deployment["spec"].get("replicas", 1)):
                self.pods.append(self._make_pod(f"{deployment['metadata']['name']}-{i}", template))
        self._write_dns()
        for pod in self.pods:
            self._run_pod(pod)

    def _make_pod(self, name: str, template: dict) -> Pod:
        spec = template["spec"]
        pod = Pod(name, spec, template["metadata"].get("labels", {}))
        for container in spec.get("initContainers", []) + spec["containers"]:
            for port in container.get("ports", []):
                pod.ports[port["containerPort"]] = free_port(LOCAL_IP)
        for volume in spec.get("volumes", []):
            if "hostPath" in volume:
                pod.mounts[volume["name"]] = self.host_paths[volume["hostPath"]["path"]]
                continue
            local = self.folder / name / volume["name"]
            local.mkdir(parents=True)
            if "secret" in volume:
                for key, value in self.secrets[volume["secret"]["secretName"]].items():
                    (local / key).write_text(value)
            elif "emptyDir" in volume and volume["name"] == "model" and self.seed_volume:
                shutil.copytree(self.seed_volume, local, dirs_exist_ok=True, symlinks=True)
            pod.mounts[volume["name"]] = local
        return pod

    def _write_dns(self) -> None:
        """Headless Service names -> their pods' gRPC addresses (what the router's resolver returns)."""
        answers = {}
        for service in self.services:
            if service["spec"].get("clusterIP") != "None":
                continue
            pods, target = self._selected(service), service["spec"]["ports"][0]
            for host in _dns_names(service, self.namespace):
                answers[host] = [f"{LOCAL_IP}:{self._target_port(p, target)}" for p in pods]
        self.answers.write_text(json.dumps(answers))

    def _selected(self, service: dict) -> list[Pod]:
        selector = service["spec"]["selector"]
        return [p for p in self.pods if all(p.labels.get(k) == v for k, v in selector.items())]

    @staticmethod
    def _target_port(pod: Pod, service_port: dict) -> int:
        target = service_port.get("targetPort", service_port["port"])
        for container in pod.spec["containers"]:
            for port in container.get("ports", []):
                if target in (port.get("name"), port["containerPort"]):
                    return pod.ports[port["containerPort"]]
        raise AssertionError(f"{pod.name}: no container port {target}")

    def _run_pod(self, pod: Pod) -> None:
        for container in pod.spec.get("initContainers", []):
            proc, log = self._spawn(pod, container)
            assert proc.wait(300) == 0, f"init container {container['name']} failed:\n{log.read_text()[-3000:]}"
        for container in pod.spec["containers"]:
            proc, log = self._spawn(pod, container)
            pod.procs.append((container["name"], proc, log))

    def _spawn(self, pod: Pod, container: dict) -> tuple[subprocess.Popen, Path]:
        env = self._env(pod, container)
        argv = [self._localize(pod, _expand(a, env)) for a in container.get("command", []) + container.get("args", [])]
        argv = self._executable(argv)
        log = self.folder / f"{pod.name}-{container['name']}.log"
        proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        return proc, log

    def _env(self, pod: Pod, container: dict) -> dict[str, str]:
        env = {}
        for item in container.get("env", []):
            source = item.get("valueFrom", {})
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": pod.name, "status.podIP": LOCAL_IP}[path]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[item["name"]] = self.secrets[ref["name"]][ref["key"]]
            else:
                env[item["name"]] = _expand(str(item.get("value", "")), env)
        return {k: self._localize_mounts(container, pod, v) for k, v in env.items()}

    def _localize(self, pod: Pod, arg: str) -> str:
        """A rendered argument as this machine runs it: local ports, loopback, local folders, Services."""
        if arg == "0.0.0.0":
            return LOCAL_IP
        if arg.isdigit() and int(arg) in pod.ports:
            return str(pod.ports[int(arg)])
        for service in self.services:
            if service["spec"].get("clusterIP") == "None":
                continue
            for port in service["spec"]["ports"]:
                local = f"{LOCAL_IP}:{self._target_port(self._selected(service)[0], port)}"
                for host in _dns_names(service, self.namespace):
                    arg = re.sub(rf"(?<![\w.-]){re.escape(host)}:{port['port']}\b", local, arg)
        for container in pod.spec.get("initContainers", []) + pod.spec["containers"]:
            arg = self._localize_mounts(container, pod, arg)
        return arg

    @staticmethod
    def _localize_mounts(container: dict, pod: Pod, value: str) -> str:
        for mount in container.get("volumeMounts", []):
            path = mount["mountPath"]
            if path != "/dev/shm" and (value == path or value.startswith(path + "/")):
                return str(pod.mounts[mount["name"]]) + value[len(path):]
        return value

    def _executable(self, argv: list[str]) -> list[str]:
        """The image's `baton` and `python3` are this checkout's; the router resolves names through fake DNS."""
        if argv[0] == "python3":
            return [sys.executable, *argv[1:]]
        assert argv[0] == "baton", argv
        if argv[1] == "router":
            return [sys.executable, "-m", "tests.helpers.fake_dns", str(self.answers), *argv[1:]]
        return [sys.executable, "-m", "baton.deploy.cli", *argv[1:]]

    # --- probes ----------------------------------------------------------------------
    def wait_started(self, limit_s: float = 300) -> None:
        """Every container's startup probe passes (within its own budget, at most `limit_s`)."""
        deadline = time.monotonic() + limit_s
        for pod in self.pods:
            for container in pod.spec["containers"]:
                probe = container.get("startupProbe")
                budget = probe["periodSeconds"] * probe["failureThreshold"] if probe else 0
                until = min(deadline, time.monotonic() + budget)
                while not self.probe(pod, container, "startupProbe"):
                    self._check_alive(pod)
                    assert time.monotonic() < until, f"{pod.name}: startup probe never passed\n{pod.log()}"
                    time.sleep(probe.get("periodSeconds", 1) / 4)

    def wait_ready(self, limit_s: float = 240) -> None:
        """Poll every container's readiness probe, as the kubelet does, until all pass."""
        deadline = time.monotonic() + limit_s
        for pod in self.pods:
            for container in pod.spec["containers"]:
                while not self.probe(pod, container, "readinessProbe"):
                    self._check_alive(pod)
                    assert time.monotonic() < deadline, f"{pod.name}: never ready\n{pod.log()}"
                    time.sleep(0.5)

    def probe(self, pod: Pod, container: dict, kind: str) -> bool:
        """Run one probe of a container once; True when it passes (no probe declared passes)."""
        probe = container.get(kind)
        if probe is None:
            return True
        timeout = probe.get("timeoutSeconds", 1)
        if "grpc" in probe:
            return _grpc_serving(f"{LOCAL_IP}:{self._port(pod, container, probe['grpc']['port'])}",
                                 probe["grpc"].get("service", ""), timeout)
        if "tcpSocket" in probe:
            try:
                socket.create_connection((LOCAL_IP, self._port(pod, container, probe["tcpSocket"]["port"])),
                                         timeout).close()
                return True
            except OSError:
                return False
        if "httpGet" in probe:
            url = f"http://{LOCAL_IP}:{self._port(pod, container, probe['httpGet']['port'])}{probe['httpGet']['path']}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as reply:
                    return 200 <= reply.status < 400
            except OSError:
                return False
        argv = self._executable([self._localize(pod, a) for a in probe["exec"]["command"]])
        return subprocess.run(argv, cwd=REPO, timeout=timeout + 30, capture_output=True).returncode == 0

    @staticmethod
    def _port(pod: Pod, container: dict, port) -> int:
        """A probe's port (number or container port name) on this machine."""
        for declared in container.get("ports", []):
            if port in (declared.get("name"), declared["containerPort"]):
                return pod.ports[declared["containerPort"]]
        raise AssertionError(f"{pod.name}: probe port {port} is not a container port")

    @staticmethod
    def _check_alive(pod: Pod) -> None:
        for name, proc, _ in pod.procs:
            assert proc.poll() is None, f"{pod.name}/{name} exited with {proc.returncode}\n{pod.log()}"

    def local_port(self, deployment: str, container_port: int) -> int:
        """Where a Deployment's first pod's container port listens here."""
        return next(p for p in self.pods if p.name.startswith(deployment + "-")).ports[container_port]

    # --- test pods and shutdown -----------------------------------------------------
    def run_test_pods(self, timeout_s: float = 300) -> list[tuple[int, str]]:
        """Run every `helm test` pod to completion: (exit code, output) each."""
        results = []
        for obj in self.objects:
            if obj["kind"] == "Pod" and obj["metadata"].get("annotations", {}).get("helm.sh/hook") == "test":
                pod = self._make_pod(obj["metadata"]["name"], obj)
                for container in obj["spec"]["containers"]:
                    proc, log = self._spawn(pod, container)
                    results.append((proc.wait(timeout_s), log.read_text()))
        return results

    def stop(self) -> None:
        """SIGTERM every pod's processes at once (as a namespace delete does), then wait for each
        (SIGKILL after 30 s): the slowest drain bounds the shutdown, not the sum of them."""
        stop_processes([proc for pod in reversed(self.pods) for _, proc, _ in pod.procs], signal.SIGTERM, 30)


def _dns_names(service: dict, namespace: str) -> list[str]:
    """The names a Service answers to inside the cluster (longest first)."""
    name = service["metadata"]["name"]
    return [f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc", f"{name}.{namespace}", name]


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command, args and env values (unknown names stay as they are)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def _grpc_serving(address: str, service: str, timeout: float) -> bool:
    async def check() -> bool:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                     timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    try:
        return asyncio.run(check())
    except grpc.aio.AioRpcError:
        return False

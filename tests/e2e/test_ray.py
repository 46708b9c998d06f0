"""`baton up --ray` on a local Ray cluster on loopback, started here with ray.init and shut down
with ray.shutdown at the end (never `ray stop`: it kills every Ray process on the machine).

One prefill and two decode workers run as Ray actors (embedded SmolLM2 on CPU, 0 GPUs each) and
the router finds them through Ray, not a list. A chat completion is served through the prefill
actor and a decode actor. A decode actor killed mid-stream (ray.kill, restart allowed) loses no
token: every stream equals the offline engine's greedy run; Ray restarts the actor with a new
address, the router drops the dead address and sends the new one work, and the launcher rewrites
the Prometheus targets. SIGINT stops everything cleanly: exit code 0, no actor left.
"""
import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from baton.services.common.server import free_port
from tests.helpers.workers import REPO

if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is installed by deploy/install.sh (the `ray` extra)", allow_module_level=True)
ray = None
"""The `ray` module, imported by `ray_cluster` once the environment that keeps it on loopback is set
(Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import)."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

NAMESPACE = "baton-e2e"
MAX_NEW = 64
PROMPTS = ["Count from one to one hundred: one, two, three,", "The alphabet, letter by letter: A, B, C, D,"]


@pytest.fixture(scope="module")
def ray_cluster():
    """The GCS address of a private Ray cluster on loopback (2 CPUs, a small object store)."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_GCS_SERVER_PORT": ""}
    saved = {k: os.environ.get(k) for k in (*env, "RAY_ADDRESS")}
    port = free_port()
    while 10002 <= port <= 19999:  # Ray's worker port range
        port = free_port()
    os.environ.update(env, RAY_GCS_SERVER_PORT=str(port))
    os.environ.pop("RAY_ADDRESS", None)
    global ray
    import ray
    ray.init(address="local", num_cpus=2, object_store_memory=100 << 20, include_dashboard=False,
             _node_ip_address="127.0.0.1", namespace=NAMESPACE, log_to_driver=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        assert gcs.startswith("127.0.0.1:"), f"Ray left loopback: {gcs} (was ray imported before this fixture?)"
        yield gcs
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Up:
    """A running `baton up --ray`: its gateway, router gRPC address, log and targets file."""

    def __init__(self, proc, http_url, grpc_address, log_path, targets):
        self.proc, self.http_url, self.grpc_address = proc, http_url, grpc_address
        self.log_path, self.targets = log_path, targets

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str):
        with urllib.request.urlopen(self.http_url + path, timeout=10) as reply:
            body = reply.read().decode()
        return json.loads(body) if path != "/metrics" else body

    def metric(self, name: str, **labels: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.get("/metrics").splitlines()
                   if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def actor_addresses() -> dict[str, str]:
    """Worker actor name -> its gRPC address, asked through Ray."""
    names = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == "baton"]
    return {name: ray.get(ray.get_actor(name, namespace="baton").info.remote(), timeout=60)["address"]
            for name in names}


@pytest.fixture(scope="module")
def up(ray_cluster, tmp_path_factory, default_model_path):
    folder = tmp_path_factory.mktemp("ray-up")
    log_path, targets = folder / "up.log", folder / "targets.json"
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_GCS_SERVER_PORT"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.deploy.cli", "up", "--ray", ray_cluster, "--ray-node-ip", "127.0.0.1",
         "--prefills", "1", "--decodes", "2", "--ray-cpus-per-worker", "0.5", "--ray-discovery-interval-s", "0.5",
         "--port", str(http_port), "--grpc-port", str(grpc_port), "--decode-only-threshold", "16",
         "--kv-cache-tokens", "8192", "--prometheus-targets", str(targets)],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    while "Baton is up" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.2)
    yield Up(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_path, targets)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0, log_path.read_text()[-4000:]
    deadline = time.monotonic() + 30
    while any(e["namespace"] == "baton" for e in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, "worker actors outlived `baton up --ray`"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def expected(default_model_path):
    """(prompt token ids, greedy continuation) per prompt, from the offline engine."""
    from baton.services.engine import LLM, SamplingParams
    llm = LLM(model=str(default_model_path), num_threads=1, kv_cache_tokens=2048)
    prompts = [list(llm.tokenizer.encode(text)) for text in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    return [(p, o.outputs[0].token_ids) for p, o in zip(prompts, outputs)]


def test_chat_completion_served_by_ray_actors(up):
    import openai
    client = openai.OpenAI(base_url=up.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content
    actors = actor_addresses()
    assert sorted(actors) == ["baton-decode-0", "baton-decode-1", "baton-prefill-0"]
    workers = {w["address"]: w for w in up.get("/workers")}
    assert set(workers) == set(actors.values())  # found through Ray: the router was given no list
    assert all(w["healthy"] for w in workers.values())
    assert up.metric("baton_router_policy_decisions_total", role="prefill", worker=actors["baton-prefill-0"]) >= 1
    assert {t["targets"][0] for t in json.loads(up.targets.read_text())} >= {up.http_url.removeprefix("http://")}


async def _stream(address: str, prompt: list[int], progress: list[int], i: int, max_tokens: int = MAX_NEW) -> list[int]:
    from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
    tokens: list[int] = []
    async with grpc.aio.insecure_channel(address) as channel:
        params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
        async for chunk in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=180):
            tokens += chunk.token_ids
            progress[i] = len(tokens)
    return tokens


def test_decode_actor_killed_mid_stream_is_survived_and_comes_back(up, expected):
    before = actor_addresses()

    async def scenario():
        progress = [0] * len(expected)
        streams = [asyncio.create_task(_stream(up.grpc_address, p, progress, i)) for i, (p, _) in enumerate(expected)]
        while min(progress) < 3:
            assert not any(s.done() for s in streams), [s.result() for s in streams if s.done()]
            await asyncio.sleep(0.02)
        busy = [w["address"] for w in await asyncio.to_thread(up.get, "/workers")
                if w["role"] == "decode" and w["in_flight"] > 0]
        victim = next(name for name, address in before.items() if address == busy[0])
        ray.kill(ray.get_actor(victim, namespace="baton"), no_restart=False)
        killed_at = min(progress)
        return victim, killed_at, await asyncio.gather(*streams, return_exceptions=True)
    victim, killed_at, results = asyncio.run(scenario())
    assert killed_at < MAX_NEW
    for got, (_, want) in zip(results, expected):
        assert not isinstance(got, BaseException), repr(got)
        assert got == want
    assert up.metric("baton_router_migrations_total") >= 1

    # Ray restarts the actor: a new worker (new port, new epoch) the router finds and uses.
    handle = ray.get_actor(victim, namespace="baton")
    new = ray.get(handle.info.remote(), timeout=120)["address"]
    assert new != before[victim]
    deadline = time.monotonic() + 60
    while True:
        workers = {w["address"]: w["healthy"] for w in up.get("/workers")}
        if workers.get(new) and before[victim] not in workers:
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)

    async def burst():
        return await asyncio.gather(*(_stream(up.grpc_address, p[:12], [0], 0, 8) for p, _ in expected * 2))
    assert all(len(tokens) == 8 for tokens in asyncio.run(burst()))
    assert up.metric("baton_router_policy_decisions_total", role="decode", worker=new) >= 1
    deadline = time.monotonic() + 10
    while new not in up.targets.read_text():  # the launcher follows the restart (2 s polls)
        assert time.monotonic() < deadline, up.targets.read_text()
        time.sleep(0.2)
    assert f"{victim} restarted; serving on {new}" in up.log()


def test_an_encoder_actor_serves_and_the_routers_encoder_pool_finds_it_through_ray(ray_cluster, tmp_path_factory):
    """`baton up --ray --encoders N`'s encoder actor (a tiny LLaVA on CPU): SERVING through the
    actor, found by the router's encoder pool through Ray (`--discover-encoders PREFIX-encoder:0`),
    healthy there, and gone from it once drained."""
    from baton.deploy.ray_launcher import WorkerActor
    from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
    from baton.router.encoders import EncoderPool
    from baton.router.ray_discovery import RayWorkerResolver
    from baton.services.common.server import ServerConfig
    from baton.services.engine.config import EngineConfig
    from baton.services.worker.worker_config import WorkerConfig
    from tests.helpers.tiny_models import make_tiny_vlm
    folder = make_tiny_vlm("llava", tmp_path_factory.mktemp("ray-vlm") / "llava")
    name = "e2e-encoder-0"
    actor = ray.remote(WorkerActor).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0).remote(
        name, "encoder", EngineConfig(model=str(folder), device="cpu", dtype="float32", num_threads=1),
        WorkerConfig(transfer="tcp"), ServerConfig(port=0, metrics_port=0), 120.0)
    try:
        address = ray.get(actor.info.remote(), timeout=150)["address"]

        async def check() -> None:
            pool = EncoderPool([], "min_load", discover="e2e-encoder:0", resolver=RayWorkerResolver(NAMESPACE))
            await pool.rediscover()
            await pool.check_all()
            assert list(pool.encoders) == [address] and pool.encoders[address].healthy
            async with grpc.aio.insecure_channel(address) as channel:
                info = await worker_pb2_grpc.EncoderStub(channel).Info(worker_pb2.WorkerInfoRequest(), timeout=10)
            assert info.role == worker_pb2.ENCODER and info.ready
            await asyncio.to_thread(lambda: ray.get(actor.drain.remote(), timeout=60))
            await pool.rediscover()  # a drained actor answers no address: dropped
            assert not pool.encoders
            await pool.stop()
        asyncio.run(check())
    finally:
        ray.kill(actor, no_restart=True)

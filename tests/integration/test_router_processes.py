"""`baton router --processes 2`: two router processes on one HTTP and one gRPC port (SO_REUSEPORT)
in front of a real decode worker. Connections spread over both, every answer equals the greedy
reference, each process counts the other as a live replica and serves its own /metrics, SIGTERM
stops them all cleanly, one process dying takes the router down whole (exit 1) for the
supervisor to restart, and a SIGKILLed parent leaves no child serving the ports."""
import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from baton.services.engine import LLM, SamplingParams
from tests.helpers.router_client import router_generate
from tests.helpers.tiny_models import VOCAB, make_tiny_model
from tests.helpers.workers import start_router, start_worker, stop_all, unused_ports

PROMPTS = [[3 + (7 * i + j) % (VOCAB - 3) for j in range(5 + i % 7)] for i in range(24)]
MAX_NEW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("processes-model"))


@pytest.fixture(scope="module")
def decode(model, tmp_path_factory):
    worker = start_worker("decode", model, tmp_path_factory.mktemp("processes"))
    yield worker
    stop_all([worker])


def start_two(model, tmp, decode):
    own = unused_ports(4)
    router = start_router(model, tmp, [], [decode.address], processes=2,
                          process_ports=f"{own[0]}:{own[1]},{own[2]}:{own[3]}", served_model_name="m",
                          decode_only_threshold=1 << 20)
    return router, [f"http://127.0.0.1:{own[0]}", f"http://127.0.0.1:{own[2]}"]


def child_pids(router) -> list[int]:
    """The router processes' pids, from the parent's log."""
    return [int(p) for p in re.findall(r"router process \d \(pid (\d+)\)", router.log())]


def scrape(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def complete(url: str, prompt: list[int]) -> list[int]:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:  # a new connection each: the kernel spreads them
        return json.loads(reply.read())["choices"][0]["text"]


def test_two_processes_share_the_ports_and_stop_together(model, decode, tmp_path):
    llm = LLM(model=str(model), page_size=4, kv_cache_tokens=4096, num_threads=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    router, own = start_two(model, tmp_path, decode)
    try:
        deadline = time.monotonic() + 60  # both up (the shared port answered for the first), each seeing the other
        while _replicas(own) != [2, 2]:
            assert time.monotonic() < deadline, (_replicas(own), router.log()[-2000:])
            time.sleep(0.2)

        async def all_grpc():
            return await asyncio.gather(*(router_generate(router.grpc_address, p, MAX_NEW) for p in PROMPTS))
        assert [tokens for tokens, _, _ in asyncio.run(all_grpc())] == expected
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: complete(router.http_url, p), PROMPTS))
        assert len(texts) == len(PROMPTS) and all(isinstance(t, str) for t in texts)
        served = [scrape(u, "baton_router_requests_total") for u in own]
        assert sum(served) == 2 * len(PROMPTS) and min(served) > 0, served  # both processes took connections
        assert router.stop() == 0  # SIGTERM: both children drain and the parent exits 0
        pids = child_pids(router)
        assert len(pids) == 2 and not any(_alive(pid) for pid in pids), router.log()[-2000:]
    finally:
        router.stop()


def test_one_process_dying_stops_the_router(model, decode, tmp_path):
    router, _ = start_two(model, tmp_path, decode)
    try:
        pids = child_pids(router)
        os.kill(pids[0], signal.SIGKILL)
        assert router.proc.wait(30) == 1
        assert "exited (code -9): stopping the others" in router.log()
        assert not _alive(pids[1])
    finally:
        router.stop()


def test_a_killed_parent_leaves_no_process_serving(model, decode, tmp_path):
    router, _ = start_two(model, tmp_path, decode)
    pids = child_pids(router)
    try:
        router.proc.send_signal(signal.SIGKILL)  # no forwarding: the children see their parent die
        router.proc.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "router processes outlived their killed parent"
            time.sleep(0.1)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        router.stop()


def _replicas(own: list[str]) -> list[float]:
    """Each process's live-replica gauge (0 while its own port does not answer yet)."""
    counts = []
    for url in own:
        try:
            counts.append(scrape(url, "baton_router_live_replicas"))
        except OSError:
            counts.append(0)
    return counts


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

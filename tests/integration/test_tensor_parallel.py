"""Tensor parallelism on the CPU (gloo): a TP=2 engine equals the TP=1 engine, token for token, and a
rank dying fails fast and visibly, never hangs.

Rank 1 is a real child process (`parallel/rank_main.py`) holding half of every layer's heads and
MLP columns and half of the vocabulary; rank 0 schedules, broadcasts each step and samples. One
TP=2 engine serves the engine-level tests (a child's start-up is most of the cost); a
`baton serve decode --tp 2` worker streams over real gRPC and then loses rank 1 mid-stream; a
child whose rank 0 died exits at once (no orphan).
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from baton.services.engine import LLM, SamplingParams
from baton.services.engine.config import EngineConfig
from baton.services.engine.parallel.launch import RANK_FAILED_EXIT_CODE
from tests.helpers.grpc_client import decode_generate
from tests.helpers.tiny_models import VOCAB
from tests.helpers.workers import start_worker, wait_serving

REPO = Path(__file__).resolve().parents[2]

OPTIONS = dict(device="cpu", page_size=4, kv_cache_tokens=2048, chunked_prefill_size=32, num_threads=1)


def prompts(seed: int, count: int = 5, longest: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, longest] + [rng.randrange(2, longest) for _ in range(count - 3)]
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    """(TP=1 engine, TP=2 engine, a `baton serve decode --tp 2` worker still starting): the worker
    boots while the engines load."""
    folder = tiny_model("llama")
    worker = start_worker("decode", folder, tmp_path_factory.mktemp("tp"), tp_size=2, wait=False)
    one = LLM(str(folder), **OPTIONS)
    two = LLM(str(folder), tp_size=2, **OPTIONS)
    yield one, two, worker
    worker.stop(signal.SIGKILL)
    pids = two.engine.runner.rank_pids
    two.engine.runner.close()
    for pid in pids:  # the child rank is gone once closed (reaped by close)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_tp2_greedy_equals_tp1(engines):
    one, two, _ = engines
    batch = prompts(seed=3) + [prompts(seed=3)[2][:40] + [7, 8, 9]]  # a shared prefix: the radix cache hits
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in one.generate(batch, params)]
    got = [o.outputs[0].token_ids for o in two.generate(batch, params)]
    assert got == expected
    assert two.engine.model_config.num_kv_heads == 2 and two.engine.kv_cache.layout.num_kv_heads == 1
    two.engine.check_idle_integrity()


def test_tp2_seeded_sampling_and_prompt_logprobs_equal_tp1(engines):
    one, two, _ = engines
    params = SamplingParams(temperature=0.8, top_k=40, seed=11, max_tokens=12, ignore_eos=True, prompt_logprobs=2)
    prompt = prompts(seed=5, count=3)[2]
    a, b = one.generate([prompt], params)[0], two.generate([prompt], params)[0]
    assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert len(b.prompt_logprobs) == len(a.prompt_logprobs) == len(prompt) - 1
    for x, y in zip(a.prompt_logprobs, b.prompt_logprobs):
        assert x["token_id"] == y["token_id"]
        assert abs(x["logprob"] - y["logprob"]) < 1e-4


def test_tp2_embeddings_equal_tp1(engines):
    one, two, _ = engines
    inputs = prompts(seed=7, count=3, longest=45)  # 45 tokens: more than one 32-token chunk
    for pooling in ("last", "mean"):
        a, b = one.engine.embed(inputs, pooling), two.engine.embed(inputs, pooling)
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert max(abs(p - q) for p, q in zip(x, y)) < 1e-5
    two.engine.check_idle_integrity()


def test_tp_refuses_heads_that_do_not_split(tiny_model):
    with pytest.raises(ValueError, match=r"num_key_value_heads \(1\) is not divisible by --tp 2"):
        LLM(str(tiny_model("qwen3")), tp_size=2, **OPTIONS)  # refused before any rank starts
    with pytest.raises(ValueError, match="tp_size must be at least 1"):
        EngineConfig(tp_size=0)


PROMPT = [5, 9, 17, 33, 65, 129, 257, 11, 12, 13]
DEADLINE_S = 15.0
"""Most seconds to wait for a process to go."""
EXIT_DEADLINE_S = 5.0
"""Most seconds from killing rank 1 to the worker's exit (0.2 s measured on a loaded 2-core machine)."""


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text().lower()
    except FileNotFoundError:
        return False


def test_tp2_decode_worker_streams_tp1_tokens_then_dies_fast_with_a_rank(engines):
    """`baton serve decode --tp 2` over gRPC equals TP=1; rank 1 killed mid-stream -> the worker exits
    with RANK_FAILED_EXIT_CODE within seconds and the open stream fails (a router fails over)."""
    worker = engines[2]
    wait_serving(worker)
    try:
        child = int(re.search(r"tensor-parallel rank 1 started: pid (\d+)", worker.log()).group(1))
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        got = asyncio.run(decode_generate(worker.address, PROMPT, params))[0]
        assert got.token_ids == engines[0].generate([PROMPT], params)[0].outputs[0].token_ids
        assert got.finish_reason == "length"

        async def kill_mid_stream() -> tuple[int, BaseException | None]:
            long = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
            stream = asyncio.create_task(decode_generate(worker.address, PROMPT, long, timeout=DEADLINE_S))
            await asyncio.sleep(1.0)  # well into the stream
            assert not stream.done()
            os.kill(child, signal.SIGKILL)
            try:
                await stream
            except grpc.RpcError as error:
                return time.monotonic(), error
            return time.monotonic(), None

        killed = time.monotonic()
        ended, error = asyncio.run(kill_mid_stream())
        assert error is not None, "the stream completed although a rank died"
        code = worker.proc.wait(timeout=DEADLINE_S)
        assert code == RANK_FAILED_EXIT_CODE, worker.log()[-2000:]
        assert time.monotonic() - killed < EXIT_DEADLINE_S + 1.0 and ended - killed < EXIT_DEADLINE_S
        assert f"tensor-parallel rank 1 (pid {child}) killed by signal 9" in worker.log()
    finally:
        worker.stop(signal.SIGKILL)


PARENT = """
import os, subprocess, time
from baton.services.engine.parallel.launch import child_command
child = subprocess.Popen(child_command(1, 2, 9, "{}", os.getpid()), stdin=subprocess.PIPE)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_rank_0_gone_ends_the_child():
    """A child rank whose rank 0 died (here: before the rendezvous, where nothing else would end it
    for minutes) exits at once: the kernel kills it when its starting thread ends (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    killed = time.monotonic()
    parent.kill()
    parent.wait()
    while _alive(child) and time.monotonic() - killed < DEADLINE_S:
        time.sleep(0.1)
    assert not _alive(child), "rank 1 outlived rank 0"
    assert time.monotonic() - killed < EXIT_DEADLINE_S

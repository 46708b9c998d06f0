"""Migration resumes a request's state, not just its text: real router and worker processes on
loopback, a tiny random-weight model with a byte-level BPE tokenizer (so JSON and stop strings
are real text). 8 concurrent streams mixing a JSON schema, a regex, an EBNF choice, penalties,
seeded sampling, a stop string and n = 2 start on decode worker A; a second decode worker B
joins, and A is killed (SIGKILL). Every stream, each completion of the n = 2 ones included,
must equal the fault-free reference token for token and text for text, with the same finish
reason. (A drain past its limit moves streams the same way: test_abandoned_and_drained.py.)"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import grpc
import pytest

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2
from tests.helpers.text_tiny_model import make_text_tiny_model
from tests.helpers.workers import start_router, start_worker, wait_serving

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "minLength": 30, "maxLength": 40},
                         "tags": {"type": "array", "items": {"type": "string", "minLength": 4, "maxLength": 8},
                                  "minItems": 4, "maxItems": 6}},
          "required": ["name", "tags"]}
PROMPT = [1, 9906, 11, 638, 314, 253, 1345, 30, 1184, 339, 4451, 28]


def _params(**fields) -> common_pb2.SamplingParams:
    structured = fields.pop("structured", None)
    params = common_pb2.SamplingParams(max_tokens=fields.pop("max_tokens", 50), **fields)
    if structured is not None:
        params.structured_output.CopyFrom(structured)
    return params


STREAMS = [
    _params(temperature=0.9, seed=11, structured=common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    _params(temperature=0.0, structured=common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    _params(temperature=0.8, seed=3, structured=common_pb2.StructuredOutput(regex=r"[a-z]{3,9}( [a-z]{2,8}){40,60}\.")),
    _params(temperature=1.0, seed=5, min_tokens=45, structured=common_pb2.StructuredOutput(
        ebnf='root ::= ("alpha" | "beta" | "gamma") (", " ("alpha" | "beta" | "gamma"))*')),
    _params(temperature=0.7, seed=8, frequency_penalty=1.5, presence_penalty=0.8, repetition_penalty=1.3,
            ignore_eos=True),
    _params(temperature=1.1, top_p=0.9, top_k=40, seed=2**64 - 1, ignore_eos=True, stop=["\x00held"]),
    _params(n=2, temperature=0.9, seed=2**64 - 1, presence_penalty=1.0, ignore_eos=True),
    _params(n=2, temperature=0.8, seed=77, structured=common_pb2.StructuredOutput(regex=r"([a-z]{2,6} ){60,80}")),
]


def router_metric(router, name: str) -> float:
    import urllib.request
    with urllib.request.urlopen(router.http_url + "/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.split("{")[0].split(" ")[0] == name)


@pytest.fixture(scope="module")
def model(tmp_path_factory, default_model_path):
    return make_text_tiny_model(tmp_path_factory.mktemp("migration-model"), default_model_path)


async def _stream(address: str, params: common_pb2.SamplingParams, progress: list, slot: int) -> dict:
    """Per completion index: (tokens, text, finish_reason)."""
    out: dict[int, list] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=PROMPT), params=params)
        async for chunk in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=180):
            entry = out.setdefault(chunk.index, [[], "", ""])
            entry[0] += list(chunk.token_ids)
            entry[1] += chunk.text
            entry[2] = chunk.finish_reason or entry[2]
            progress[slot] = min(len(e[0]) for e in out.values()) if len(out) == (params.n or 1) else 0
    return {i: tuple(v) for i, v in out.items()}


async def _run_all(address: str, on_progress=None):
    progress = [0] * len(STREAMS)
    tasks = [asyncio.ensure_future(_stream(address, p, progress, i)) for i, p in enumerate(STREAMS)]
    while on_progress is not None and not all(t.done() for t in tasks):
        await on_progress(progress)
        await asyncio.sleep(0.02)
    return await asyncio.gather(*tasks, return_exceptions=True)


async def _register_and_wait(router, address: str) -> None:
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await stub.RegisterWorker(router_pb2.RegisterWorkerRequest(address=address, role=worker_pb2.DECODE))
        for _ in range(200):
            workers = (await stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
            if any(w.address == address and w.healthy for w in workers):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{address} never turned healthy in the router")


def test_killed_decode_worker_streams_equal_the_fault_free_run(model, tmp_path):
    first, second, prefill = (start_worker(role, model, tmp_path, kv_cache_tokens=8192, wait=False)
                              for role in ("decode", "decode", "prefill"))  # they load side by side
    router = None
    try:
        router = start_router(model, tmp_path, [prefill.address], [first.address], decode_only_threshold=4)
        for worker in (first, second, prefill):
            wait_serving(worker)
        reference = asyncio.run(_run_all(router.grpc_address))
        for result in reference:
            assert not isinstance(result, BaseException), repr(result)
        moved = []

        async def fault_when_streaming(progress):
            if not moved and min(progress) >= 3:
                await _register_and_wait(router, second.address)
                moved.append(list(progress))
                first.proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        results = asyncio.run(_run_all(router.grpc_address, fault_when_streaming))
        assert moved, "the fault never happened"
        for i, (got, want) in enumerate(zip(results, reference)):
            assert not isinstance(got, BaseException), (i, repr(got))
            assert got.keys() == want.keys(), i
            for index in want:
                assert got[index][0] == want[index][0], (i, index, "tokens")
                assert got[index][1] == want[index][1], (i, index, "text")
                assert got[index][2] == want[index][2], (i, index, "finish")
        unfinished = [i for i, (p, want) in enumerate(zip(moved[0], reference))
                      if p < min(len(c[0]) for c in want.values())]
        assert len(unfinished) >= 6, (moved, [{k: len(v[0]) for k, v in r.items()} for r in reference])
        assert second.metric("baton_worker_requests_total", status="ok") >= len(unfinished)
        assert router_metric(router, "baton_router_migrations_total") >= len(unfinished)
        assert time.monotonic() - started < 120
    finally:
        if router is not None:
            router.stop()
        for worker in (first, second, prefill):
            worker.stop(signal.SIGKILL)

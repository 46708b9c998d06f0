"""Prompt logprobs through real processes (tiny model, a prefill and a decode worker, the
router): the router's gRPC `Generate` returns them on the first chunk, equal to the offline
engine's; the router sends such requests decode-only even when the prompt is long enough to
disaggregate; and a decode worker named a prefill worker still serves them itself."""
import asyncio
import random
import urllib.request

import grpc
import pytest

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from baton.services.engine import LLM, SamplingParams
from tests.helpers.grpc_client import decode_generate
from tests.helpers.tiny_models import VOCAB, make_tiny_model
from tests.helpers.workers import start_router, start_worker, stop_all, wait_all_serving

PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("plp-model"))


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plp")
    prefill, decode = wait_all_serving([start_worker(role, model, tmp, wait=False) for role in ("prefill", "decode")])
    router = start_router(model, tmp, [prefill.address], [decode.address], decode_only_threshold=4)
    yield prefill, decode, router
    assert stop_all((router, decode, prefill)) == [0, 0, 0]


@pytest.fixture(scope="module")
def prompt():
    rng = random.Random(3)
    return [rng.randrange(3, VOCAB) for _ in range(40)]


@pytest.fixture(scope="module")
def expected(model, prompt):
    llm = LLM(model=str(model), page_size=4, kv_cache_tokens=4096, num_threads=1)
    return llm.generate([prompt], PARAMS)[0]


def paths(router) -> dict[str, float]:
    with urllib.request.urlopen(router.http_url + "/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return {path: sum(float(line.rsplit(" ", 1)[1]) for line in lines
                      if line.startswith("baton_router_paths_total") and f'path="{path}"' in line)
            for path in ("decode_only", "disaggregated")}


def same_entries(wire, engine_entries):
    assert [e.token_id for e in wire] == [e["token_id"] for e in engine_entries]
    for got, want in zip(wire, engine_entries):
        assert got.logprob == pytest.approx(want["logprob"], abs=1e-5)
        assert [t.token_id for t in got.top_logprobs] == [t for t, _ in want["top_logprobs"]]


async def router_chunks(address, prompt, params):
    async with grpc.aio.insecure_channel(address) as channel:
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=prompt), params=params)
        return [chunk async for chunk in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60)]


def test_router_grpc_returns_prompt_logprobs_decode_only(cluster, prompt, expected):
    prefill, decode, router = cluster
    before = paths(router)
    params = common_pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    chunks = asyncio.run(router_chunks(router.grpc_address, prompt, params))
    assert chunks[0].prompt_logprobs and not any(c.prompt_logprobs for c in chunks[1:])
    same_entries(chunks[0].prompt_logprobs, expected.prompt_logprobs)
    assert sum((list(c.token_ids) for c in chunks), []) == expected.outputs[0].token_ids
    after = paths(router)
    assert after["decode_only"] == before["decode_only"] + 1 and after["disaggregated"] == before["disaggregated"]
    plain = common_pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    asyncio.run(router_chunks(router.grpc_address, [p + 1 for p in prompt], plain))
    assert paths(router)["disaggregated"] == after["disaggregated"] + 1  # the same length without: disaggregated


def test_decode_named_a_prefill_worker_still_scores_locally(cluster, prompt, expected):
    prefill, decode, router = cluster
    sent = prefill.metric("baton_kv_transfer_bytes_total")
    [completion] = asyncio.run(decode_generate(decode.address, prompt, PARAMS, prefill=prefill.address))
    same_entries(completion.prompt_logprobs, expected.prompt_logprobs)
    assert completion.token_ids == expected.outputs[0].token_ids
    assert prefill.metric("baton_kv_transfer_bytes_total") == sent  # prefill was not asked


def test_prompt_logprobs_start_skips_the_head(cluster, prompt, expected):
    prefill, decode, router = cluster
    params = common_pb2.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=30)
    chunks = asyncio.run(router_chunks(router.grpc_address, prompt, params))
    assert [e.token_id for e in chunks[0].prompt_logprobs] == prompt[30:]
    for got, want in zip(chunks[0].prompt_logprobs, expected.prompt_logprobs[29:]):
        assert got.logprob == pytest.approx(want["logprob"], abs=1e-5)

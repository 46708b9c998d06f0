"""One user's grammar cannot hurt the others (real router and decode worker on loopback, a tiny
model with a byte-level BPE tokenizer):
- a self-recursive JSON schema (`{"$ref": "#"}`) or a grammar whose only continuation is banned
  fails that request alone with a 400-class error naming the field, while the requests sharing
  its batch complete, and the worker's breaker stays closed;
- grammars compile off the engine thread: a slow EBNF times out cleanly (400) while another
  stream keeps producing tokens; a spec over the size limit is refused at once."""
from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request

import grpc
import pytest

from baton.protos.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from baton.protos.errors import error_from_rpc
from tests.helpers.text_tiny_model import make_text_tiny_model
from tests.helpers.workers import start_router, start_worker, wait_serving

PROMPT = [1, 9906, 11, 638, 314, 253, 1345, 30]
COMPILE_TIMEOUT_S = 1.0
MAX_GRAMMAR_BYTES = 400_000


def slow_ebnf(rules: int) -> str:
    """An EBNF of many chained rules: compiling it takes seconds (well past COMPILE_TIMEOUT_S)."""
    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(8))
    lines = ["root ::= " + " | ".join(f"r{i}" for i in range(rules))]
    lines += [f'r{i} ::= "{word()}" [a-z]* "{word()}" r{(i + 1) % rules}?' for i in range(rules)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, default_model_path):
    tmp = tmp_path_factory.mktemp("grammar-isolation")
    model = make_text_tiny_model(tmp / "model", default_model_path)
    decode = start_worker("decode", model, tmp, kv_cache_tokens=8192, max_grammar_bytes=MAX_GRAMMAR_BYTES,
                          grammar_compile_timeout_s=COMPILE_TIMEOUT_S, wait=False)
    router = None
    try:
        router = start_router(model, tmp, [], [decode.address], breaker_failures=2)  # starts while decode loads
        wait_serving(decode)
        yield router, decode
    finally:
        if router is not None:
            router.stop()
        decode.stop()


async def generate(address: str, params: common_pb2.SamplingParams, gaps: list | None = None):
    """(tokens, finish_reason); `gaps` collects the seconds between consecutive chunks."""
    tokens, finish, last = [], "", None
    async with grpc.aio.insecure_channel(address) as channel:
        request = router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=PROMPT), params=params)
        async for chunk in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120):
            now = time.monotonic()
            if gaps is not None and last is not None:
                gaps.append((last, now))
            last = now
            tokens += list(chunk.token_ids)
            finish = chunk.finish_reason or finish
    return tokens, finish


def structured(**kind) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(max_tokens=30, temperature=0.0, min_tokens=kind.pop("min_tokens", 0))
    params.structured_output.CopyFrom(common_pb2.StructuredOutput(**kind))
    return params


def good(max_tokens: int = 120) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def breaker_states(router) -> list[str]:
    async def ask():
        async with grpc.aio.insecure_channel(router.grpc_address) as channel:
            return (await router_pb2_grpc.RouterStub(channel).ListWorkers(router_pb2.ListWorkersRequest())).workers
    return [w.breaker_state for w in asyncio.run(ask())]


def http_completion(router, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(router.http_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_bad_grammar_fails_alone_and_the_breaker_stays_closed(cluster):
    router, _ = cluster
    reference, _ = asyncio.run(generate(router.grpc_address, good()))
    bad = [structured(json_schema='{"$ref": "#"}') for _ in range(3)]
    bad.append(structured(ebnf='root ::= "x"', min_tokens=5))  # after "x" only EOS fits, and EOS is banned

    async def scenario():
        progress: list = []
        good_streams = [asyncio.ensure_future(generate(router.grpc_address, good(), progress)) for _ in range(3)]
        while len(progress) < 6:  # the good requests are in the running batch
            await asyncio.sleep(0.01)
        bad_results = await asyncio.gather(*(generate(router.grpc_address, p) for p in bad),
                                           return_exceptions=True)
        return await asyncio.gather(*good_streams, return_exceptions=True), bad_results
    good_results, bad_results = asyncio.run(scenario())
    for result in good_results:
        assert not isinstance(result, BaseException), repr(result)
        assert result == (reference, "length")
    for result in bad_results:
        assert isinstance(result, grpc.RpcError), repr(result)
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = error_from_rpc(result)
        assert "no token can be sampled" in error.message and error.param == "response_format"
    assert breaker_states(router) == ["closed"]
    status, body = http_completion(router, {"prompt": "Hello", "max_tokens": 8,
                                            "response_format": {"type": "json_schema", "json_schema": {
                                                "name": "loop", "schema": {"$ref": "#"}}}})
    assert status == 400 and body["error"]["param"].startswith("response_format"), body
    assert asyncio.run(generate(router.grpc_address, good(10)))[1] == "length"
    assert breaker_states(router) == ["closed"]


def test_slow_grammar_compiles_off_the_engine_thread_and_times_out(cluster):
    router, _ = cluster
    ebnf = slow_ebnf(5000)
    assert len(ebnf) < MAX_GRAMMAR_BYTES

    async def scenario():
        gaps: list = []
        stream = asyncio.ensure_future(generate(router.grpc_address, good(400), gaps))
        while len(gaps) < 3:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        try:
            await generate(router.grpc_address, structured(ebnf=ebnf))
            outcome = None
        except grpc.RpcError as error:
            outcome = error
        ended = time.monotonic()
        result = await stream
        return outcome, started, ended, gaps, result
    outcome, started, ended, gaps, result = asyncio.run(scenario())
    assert isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_from_rpc(outcome)
    assert "took longer than" in error.message and error.param == "grammar", error
    assert COMPILE_TIMEOUT_S * 0.9 <= ended - started < COMPILE_TIMEOUT_S + 5
    assert result[1] == "length" and len(result[0]) == 400
    during = [b - a for a, b in gaps if b > started and a < ended]
    assert during and max(during) < 0.5, max(during)  # the other stream never waited for the compile


def test_oversized_spec_is_refused_at_once(cluster):
    router, _ = cluster
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as excinfo:
        asyncio.run(generate(router.grpc_address, structured(regex="a" * (MAX_GRAMMAR_BYTES + 1))))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_from_rpc(excinfo.value)
    assert "--max-grammar-bytes" in error.message and error.param == "regex"
    assert time.monotonic() - started < 5
    assert breaker_states(router) == ["closed"]

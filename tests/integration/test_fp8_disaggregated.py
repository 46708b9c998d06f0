"""An fp8 KV cache across processes: prefill -> decode over tcp moves fp8 blocks (raw bytes,
scales compared at the handshake: both workers calibrate to the same powers of two) and decode
continues exactly like a colocated fp8 engine. (Peers with another dtype or other scales are
refused by the handshake: tests/unit/worker/test_kv_memory_fp8.py; that a LAYOUT_MISMATCH
reaches the client as such: tests/integration/test_disaggregated_faults.py.)"""
import asyncio
import random

import pytest

from baton.services.engine import LLM, SamplingParams
from tests.helpers.grpc_client import decode_generate, worker_info
from tests.helpers.tiny_models import VOCAB, make_tiny_model
from tests.helpers.workers import start_worker, stop_all, wait_all_serving

PAGE, CHUNK = 4, 16
FP8 = dict(kv_cache_dtype="fp8_e4m3", chunked_prefill_size=CHUNK)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("fp8-disagg-model"))


@pytest.fixture(scope="module")
def workers(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8-cluster")
    prefill, decode = wait_all_serving([start_worker(role, model, tmp, transfer="tcp", wait=False, **FP8)
                                        for role in ("prefill", "decode")])
    yield prefill, decode
    codes = stop_all((decode, prefill))
    assert codes == [0, 0], decode.log()[-2000:] + prefill.log()[-2000:]


def prompts(seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 6, CHUNK * 2 + 3, 45)]


def test_disaggregated_fp8_equals_colocated_fp8(workers, model):
    prefill, decode = workers
    batch = prompts(21)
    colocated = LLM(model=str(model), page_size=PAGE, kv_cache_tokens=4096, num_threads=1, **FP8)
    expected = [o.outputs[0].token_ids for o in colocated.generate(batch, GREEDY)]

    async def run_all():
        return await asyncio.gather(*(decode_generate(decode.address, p, GREEDY, prefill=prefill.address)
                                      for p in batch))

    got = [r[0].token_ids for r in asyncio.run(run_all())]
    assert got == expected
    moved = prefill.metric("baton_kv_transfer_bytes_total", direction="out")
    page_bytes = PAGE * 2 * 2 * 2 * 16  # K + V, 2 layers, 2 KV heads, head_dim 16: one byte an element
    pages = sum(-(-len(p) // PAGE) for p in batch)
    assert 16 * page_bytes <= moved <= pages * page_bytes  # fp8 pages (float32 ones are 4x larger)
    assert asyncio.run(worker_info(decode.address)).load.kv_usage == 0


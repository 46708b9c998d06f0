"""Start-up on CUDA: by-device defaults, the KV pool from this process's share, and the
warm-up that compiles every Triton kernel variant before the first request.

After construction (warm-up included) the engine is idle and whole; requests of lengths,
batch sizes and sampling settings it never saw compile nothing new (each Triton kernel's
per-device cache keeps its entry count); greedy outputs equal an engine's that skipped the
warm-up. The GPU sizing leaves the pool the share minus what this process holds.
"""
from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from baton.services.engine import LLM, SamplingParams  # noqa: E402
from baton.services.engine.attention import triton_kernels  # noqa: E402
from baton.services.engine.config import EngineConfig  # noqa: E402
from baton.services.engine.device_defaults import batch_defaults, device_total_memory  # noqa: E402
from baton.services.engine.models import gemv, triton_ops  # noqa: E402
from baton.services.engine.sampling import gpu_argmax  # noqa: E402
from tests.helpers.tiny_models import VOCAB, make_tiny_model  # noqa: E402

CONTEXT = 12288


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("warmup_gpu"), max_position_embeddings=CONTEXT)


def kernels():
    found = []
    for module in (triton_kernels, triton_ops, gemv, gpu_argmax):
        found += [v for v in vars(module).values() if isinstance(v, triton.runtime.jit.JITFunction)]
    return found


def compiled() -> dict[str, int]:
    """Compiled variants of each of the engine's Triton kernels, in this process."""
    return {k.__name__: sum(len(entry[0]) for entry in getattr(k, "device_caches", {}).values()) for k in kernels()}


def make(folder, **options) -> LLM:
    return LLM(model=str(folder), device="cuda", dtype="bfloat16", page_size=16, kv_cache_tokens=1 << 18,
               **options)


def test_defaults_follow_the_gpu_and_warmup_leaves_the_engine_whole(folder):
    llm = make(folder)
    engine = llm.engine
    want = batch_defaults("cuda", device_total_memory(torch.device("cuda")))
    assert engine.config.max_running_requests == want.max_running_requests
    assert engine.config.max_num_batched_tokens == want.max_num_batched_tokens
    assert engine.runner.graph_bs[-1] == min(want.cuda_graph_max_bs, want.max_running_requests)
    engine.check_idle_integrity()
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks and stats.cached_blocks == 0
    assert stats.prefix_tokens_looked_up == stats.preemptions == 0 and engine.num_overlapped_steps == 0
    assert compiled()["_extend_kernel"] >= 1 and compiled()["_decode_split_kernel"] >= 1


def test_new_shapes_after_warmup_compile_nothing(folder):
    llm = make(folder)
    before = compiled()
    rng = random.Random(11)
    lengths = [7, 37, 333, 1500, 8192 + 77, 11000] + [rng.randrange(1, 200) for _ in range(40)]
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
    params = [SamplingParams(max_tokens=rng.randrange(2, 12), ignore_eos=True,
                             temperature=rng.choice([0.0, 0.6, 1.0]), top_p=rng.choice([1.0, 0.8]),
                             top_k=rng.choice([-1, 7]), min_tokens=rng.choice([0, 1]), seed=i)
              for i in range(len(prompts))]
    llm.generate(prompts, params)
    many = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 30))] for _ in range(700)]
    llm.generate(many, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # eager decode past graphs
    llm.generate(many[:37], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    llm.generate([prompts[0]], SamplingParams(max_tokens=3, repetition_penalty=1.2, logprobs=3))
    after = compiled()
    new = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    assert not new, f"kernels compiled after warm-up: {new}"


def test_warmup_does_not_change_greedy_outputs(folder):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 600))] for _ in range(24)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    cold = [o.outputs[0].token_ids for o in make(folder, skip_warmup=True).generate(prompts, params)]
    warm = [o.outputs[0].token_ids for o in make(folder).generate(prompts, params)]
    assert warm == cold


def test_the_pool_is_this_processs_share_minus_what_it_holds(folder):
    from baton.services.engine.engine_setup import kv_cache_tokens
    from baton.services.engine.device_defaults import resolve_config
    from baton.services.engine.gpu_memory import SLACK_BYTES
    from baton.services.engine.models.loader import load_model
    from baton.services.engine.models.model_config import ModelConfig
    device = torch.device("cuda")
    total = device_total_memory(device)
    model_config = ModelConfig.from_folder(folder)
    model = load_model(folder, model_config, torch.bfloat16, device)
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved(device)
    config = resolve_config(EngineConfig(model=str(folder), mem_fraction_static=0.05), "cuda", total)
    bytes_per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * 2
    tokens = kv_cache_tokens(config, bytes_per_token, device, model, torch.bfloat16, CONTEXT)
    pool = tokens * bytes_per_token
    share = int(total * 0.05)
    assert share - held - pool >= SLACK_BYTES  # the rest of the share: step workspace and graphs
    assert share - held - pool < SLACK_BYTES + (4 << 30)  # ... and not more than a tiny model needs
    with pytest.raises(ValueError, match="weights.*raise --mem-fraction-static"):
        kv_cache_tokens(EngineConfig(mem_fraction_static=1e-6), bytes_per_token, device, model, torch.bfloat16,
                        CONTEXT)


TWO_WORKERS = r'''
import pathlib, sys, time
import torch
from baton.services.engine import LLM, SamplingParams
folder, mine, other = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
llm = LLM(model=folder, device="cuda", dtype="bfloat16", mem_fraction_static=0.42)
mine.write_text("built")
deadline = time.monotonic() + 120
while not other.exists():  # both hold their pools before either serves
    assert time.monotonic() < deadline, "the other worker never started"
    time.sleep(0.1)
llm.generate([[5] * 9000, [7] * 30] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
llm.generate([[i % 300 + 3] * 20 for i in range(1024)],
             SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, top_p=0.9))
torch.cuda.synchronize()
share = 0.42 * torch.cuda.get_device_properties(0).total_memory
print("peak", torch.cuda.max_memory_reserved() / share, "free GiB", torch.cuda.mem_get_info()[0] / 2**30)
assert torch.cuda.max_memory_reserved() <= share
mine.with_suffix(".done").write_text("done")
while not other.with_suffix(".done").exists() and time.monotonic() < deadline:
    time.sleep(0.1)
'''


def test_two_workers_at_042_share_one_gpu(tmp_path):
    """`baton up --prefills 1 --decodes 1` on one GPU: two processes at 0.42 each fit, pools
    sized without --kv-cache-tokens, neither growing past its share while serving."""
    import os
    import subprocess
    import sys
    big = make_tiny_model("llama", tmp_path / "model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=CONTEXT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, "-c", TWO_WORKERS, str(big), str(x), str(y)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for x, y in ((a, b), (b, a))]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        print(out.strip().splitlines()[-1])

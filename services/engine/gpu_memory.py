"""GPU memory by explicit share: how big the KV pool is, from this process's own numbers.

`mem_fraction_static` is this process's share of the GPU's total memory: weights, KV pool
and activation workspace all come out of it, and nothing depends on what other processes
hold (two workers on one GPU at 0.42 each both fit, whatever order they start in). As vLLM's
`Worker.determine_available_memory` does with `gpu_memory_utilization`:

    kv_bytes = total * mem_fraction_static
               - held         (this process's torch memory after loading weights and tuning:
                               torch.cuda.memory_reserved)
               - activation   (the peak growth of reserved memory over a profile run of the
                               largest step: one max_num_batched_tokens prefill step, then one
                               decode step of max_running_requests rows with top-k / top-p
                               sampling, on a throw-away KV cache)
               - graphs       (the decode CUDA graphs, captured after the pool exists: their
                               static logits buffer plus the profiled decode activations scaled
                               to the largest captured batch)
               - SLACK_BYTES  (allocator rounding, small buffers)

The CUDA context (about half a GiB) stays outside the share, as in vLLM. Start-up fails
with a clear `ValueError` when the share cannot hold the weights, when it leaves no room for
a KV page, or when the memory it promises is not free on the GPU now (other processes took
more than the rest of the GPU). `kv_pool_bytes` and `check_share_holds` are the arithmetic,
pure functions unit-tested on CPU; `profile_step_memory` is the measurement (CUDA only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from baton.services.engine.kv.kv_cache import KVCache, KVLayout

GIB = 1 << 30
SLACK_BYTES = 256 << 20
"""Kept free inside the share for allocator rounding and small per-step buffers."""


@dataclass(frozen=True)
class StepProfile:
    """What the profile run measured."""

    activation_bytes: int
    """Peak growth of reserved memory over the largest prefill step and the largest decode step with sampling."""
    decode_forward_bytes: int
    """Peak growth over the forward pass alone of the largest decode step."""
    decode_rows: int
    """Rows of that decode step."""


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def check_share_holds(total: int, fraction: float, held: int) -> None:
    """Raise ValueError when `fraction` of `total` bytes cannot even hold the `held` bytes
    (weights and start-up buffers) this process already has."""
    share = int(total * fraction)
    if held + SLACK_BYTES > share:
        raise ValueError(
            f"--mem-fraction-static {fraction} gives this process {_gib(share)} of the GPU's {_gib(total)}, "
            f"but its weights and start-up buffers already take {_gib(held)}: raise --mem-fraction-static "
            f"(at least {(held + SLACK_BYTES) / total:.2f} just for the weights) or use a smaller model")


def kv_pool_bytes(total: int, fraction: float, held: int, activation: int, graphs: int = 0,
                  free: Optional[int] = None) -> int:
    """Bytes for the KV pool in this process's share of the GPU (see the module doc).

    total: the GPU's memory; fraction: mem_fraction_static; held: this process's torch
    memory now (weights, tuning leftovers); activation: the profiled step workspace; graphs:
    the CUDA-graph estimate; free: the GPU's free memory now (None: not checked). Raises
    ValueError when the weights do not fit, when nothing is left for the pool, or when pool
    plus workspace would not fit in the free memory."""
    check_share_holds(total, fraction, held)
    share = int(total * fraction)
    kv = share - held - activation - graphs - SLACK_BYTES
    if kv <= 0:
        raise ValueError(
            f"--mem-fraction-static {fraction} gives this process {_gib(share)}: weights {_gib(held)} plus the "
            f"workspace of the largest step {_gib(activation + graphs)} leave nothing for the KV cache; raise "
            f"--mem-fraction-static or lower --max-num-batched-tokens / --max-running-requests")
    if free is not None and kv + activation + graphs > free:
        raise ValueError(
            f"the KV pool ({_gib(kv)}) and step workspace ({_gib(activation + graphs)}) this process's share "
            f"promises do not fit in the {_gib(free)} free on the GPU (other processes hold "
            f"{_gib(max(0, total - free - held))}): make the --mem-fraction-static of the processes sharing this "
            f"GPU sum to at most about 0.9")
    return kv


def graph_reserve_bytes(max_bs: int, vocab_size: int, logits_itemsize: int, width: int,
                        profile: Optional[StepProfile]) -> int:
    """Estimated memory of the decode CUDA graphs up to batch `max_bs` (0: none): the static
    logits buffer, the static inputs (block tables `width` wide) and the decode forward's
    activations scaled from the profiled decode step."""
    if max_bs <= 0:
        return 0
    static = max_bs * vocab_size * logits_itemsize + 4 * max_bs * (5 + width)
    if profile is None or profile.decode_rows <= 0:
        return static
    return static + profile.decode_forward_bytes * max_bs // profile.decode_rows


def _dummy_request(name: str, length: int, blocks: list[int], vocab_size: int):
    from baton.services.engine.request import Request
    from baton.services.engine.sampling_params import SamplingParams
    tokens = [(7 * i + 3) % vocab_size for i in range(length)]
    return Request(request_id=name, parent_id=name, index=0, prompt_token_ids=tokens,
                   params=SamplingParams(max_tokens=1), arrival=0, block_table=blocks)


@torch.inference_mode()
def profile_step_memory(model, dtype: torch.dtype, device: torch.device, page_size: int, max_model_len: int,
                        max_num_batched_tokens: int, prefill_chunk: int, max_running_requests: int,
                        make_backend: Callable[[KVCache], object],
                        kv_dtype: Optional[torch.dtype] = None) -> StepProfile:
    """Run the largest prefill step and the largest decode step (with sampling) on a throw-away
    KV cache (of `kv_dtype`, default `dtype`; an fp8 one with unit scales) and measure how much
    reserved memory they grow by (CUDA; also compiles their kernels)."""
    from baton.services.engine.runner.model_runner import ModelRunner
    from baton.services.engine.sampling.sampler import Sampler, SamplingRow
    from baton.services.engine.sampling_params import SamplingParams
    from baton.services.engine.scheduling.scheduler import ScheduledItem
    cfg = model.config
    budget = max(1, max_num_batched_tokens)
    seq_len = max(1, min(budget, prefill_chunk, max_model_len - 1))
    lengths = [seq_len] * (budget // seq_len) + ([budget % seq_len] if budget % seq_len else [])
    rows = max(1, min(max_running_requests, budget))
    num_blocks = sum(-(-n // page_size) for n in lengths)
    kv = KVCache(KVLayout(cfg.num_layers, num_blocks, page_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype or dtype),
                 device)
    runner = ModelRunner(model, make_backend(kv), page_size, device, max_model_len=max_model_len, max_rows=rows)
    sampler = Sampler()
    heavy = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01)

    def measure(run: Callable[[], None]) -> int:
        """Peak growth of reserved memory while `run` runs, from an emptied cache."""
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_reserved(device) - base)

    prefill, first = [], 0
    for i, n in enumerate(lengths):
        blocks = list(range(first, first + -(-n // page_size)))
        first += len(blocks)
        prefill.append(ScheduledItem(_dummy_request(f"profile-prefill-{i}", n, blocks, cfg.vocab_size), 0, n))
    # one-token sequences at position 0; their blocks alias (the values written are never read)
    decode = [ScheduledItem(_dummy_request(f"profile-decode-{i}", 1, [i % num_blocks], cfg.vocab_size), 0, 1)
              for i in range(rows)]

    def step(items, sample: bool) -> None:
        logits = runner.execute(items)
        if sample:
            sampler.sample_device(logits, [SamplingRow(heavy, (), (), None)] * logits.shape[0])

    with torch.random.fork_rng(devices=[]):  # the sampler's draws leave the engine's seeded RNG alone
        prefill_peak = measure(lambda: step(prefill, True))
        forward_peak = measure(lambda: step(decode, False))
        decode_peak = measure(lambda: step(decode, True))
    del runner, kv, prefill, decode
    torch.cuda.empty_cache()
    return StepProfile(activation_bytes=max(prefill_peak, decode_peak), decode_forward_bytes=forward_peak,
                       decode_rows=rows)

"""Start-up warm-up: dummy requests through the normal step path before the engine serves.

On CUDA `Engine.__init__` runs it (unless `skip_warmup`), so a worker reports SERVING only
once every kernel variant serving reaches has been compiled (Triton) or captured (graphs),
and the first real requests pay no compile. What it runs, all through `Engine.step`
(overlapped and synchronous steps alike):

1. a bare replay of every captured decode graph (their first launch uploads them);
2. wave 1, prefills of several lengths up to the step budget: one prompt longer than a chunk
   (chunked prefill: an extend over a cached prefix), one chunk-sized, one half-chunk, a few
   short ones (1, 2, a page + 1, ...). The budget admits them a few per step, so the wave
   also runs mixed steps (a long-context decode, which splits its keys, next to prefills)
   and decode steps; one request asks for penalties and logprobs (a synchronous step);
3. wave 2, decode batches of 1, 3, the largest graph and `max_running_requests` short
   requests (graphed sizes replay graphs, larger ones decode eagerly on one split), each
   batch admitted in two halves so a mixed step with short contexts runs too; one request
   reuses wave 1's cached prefix (an extend over a radix-cache hit);
every wave mixes greedy rows (the Triton argmax), seeded temperature / top-k / top-p / min-p
rows (sort, softmax, inverse-CDF draw) and rows with banned tokens (min_tokens).

With the attention kernels' varying integers unspecialized and their index buffers 16-byte
aligned (`attention/triton_kernels.py`, `attention/triton_backend.py`), the variants left
are fixed by the model, the page size and the dtype, plus single- or multi-split decode:
the waves above reach each of them. Sizes shrink to fit a small KV pool or context.

Afterwards the engine is idle and whole: no request, prefix cache empty, the block pool
handing out blocks from id 0 again, since-start counters (prefix hits, preemptions,
overlapped steps) at zero, and torch's default CPU random state as before.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from baton.services.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

MAX_NEW = 3
"""Tokens each warm-up request generates (so every request decodes a few steps)."""
SHORT = 4
"""Prompt length of the decode waves' requests."""
PREFIX = "__warmup__"


@dataclass(frozen=True)
class WarmupPlan:
    """What the warm-up submits, sized to the engine."""

    prefill_lengths: tuple[int, ...]
    """Prompt lengths of wave 1, submitted together, longest first."""
    decode_batches: tuple[int, ...]
    """Batch sizes of wave 2, one batch after another."""


def _blocks(tokens: int, page: int) -> int:
    return -(-(tokens + MAX_NEW + 1) // page)  # +1: an overlapped step may run once past the finish


def plan_warmup(page_size: int, prefill_chunk: int, max_num_batched_tokens: int, max_running_requests: int,
                num_blocks: int, max_model_len: int, graph_sizes: tuple[int, ...] = ()) -> WarmupPlan:
    """The warm-up's prompt lengths and decode batch sizes for an engine of this shape (pure)."""
    longest = max(1, max_model_len - MAX_NEW - 2)
    step = max(1, min(prefill_chunk, max_num_batched_tokens))
    wanted = [step, step // 2 + 1, 3 * page_size + 1, page_size + 1, 5, 2, 1]
    if prefill_chunk < (1 << 30):
        wanted.insert(0, step + 2 * page_size + 3)  # two chunks: the second extends over a prefix
    lengths: list[int] = []
    room = num_blocks - 1
    for n in wanted:
        n = min(n, longest)
        if n in lengths or _blocks(n, page_size) > room:
            continue
        lengths.append(n)
        room -= _blocks(n, page_size)
    fit = max(1, (num_blocks - 1) // _blocks(SHORT + 2 * page_size, page_size))
    most = max(1, min(max_running_requests, fit))
    graph_max = max(graph_sizes, default=0)
    batches = sorted({b for b in (1, 3, graph_max, most) if 1 <= b <= most})
    return WarmupPlan(tuple(sorted(lengths, reverse=True)), tuple(batches))


def _params(i: int, vocab: int) -> SamplingParams:
    """Greedy, seeded sampled and banned-token rows, by turns."""
    kind = i % 4
    if kind == 1:
        return SamplingParams(max_tokens=MAX_NEW, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=i,
                              ignore_eos=True)
    if kind == 3:
        return SamplingParams(max_tokens=MAX_NEW, min_tokens=MAX_NEW, temperature=0.0, ignore_eos=True,
                              stop_token_ids=(1 % vocab,))
    return SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


def _prompt(i: int, length: int, vocab: int) -> list[int]:
    return [(i * 7919 + k * 104729 + 17) % vocab for k in range(length)]


def _drain(engine) -> None:
    for _ in range(100_000):
        if not engine.has_unfinished():
            break
        engine.step()
    else:
        raise RuntimeError("the warm-up requests did not finish")
    engine.flush()


def warm_up(engine) -> None:
    """Run the warm-up on an idle engine and leave it idle and whole (see the module doc)."""
    if engine.has_unfinished() or engine._requests:
        raise RuntimeError("warm-up needs an idle engine")
    config, runner = engine.config, engine.runner
    started = time.monotonic()
    plan = plan_warmup(config.page_size, config.prefill_chunk, config.max_num_batched_tokens,
                       config.max_running_requests, engine.pool.num_blocks, engine.max_model_len,
                       tuple(runner.graph_bs))
    vocab = engine.model_config.vocab_size
    if engine.tokenizer is not None:  # ids the tokenizer can decode (a model's vocab may be padded)
        vocab = max(2, min(vocab, len(engine.tokenizer)))
    counter = iter(range(1 << 30))

    def add(prompt: list[int], params: SamplingParams) -> None:
        engine.add_request(f"{PREFIX}{next(counter)}", prompt, params)

    with torch.random.fork_rng(devices=[]):
        if runner.use_graphs:
            runner.reset_graph_inputs()
            for bs in runner.graph_bs:
                runner.graphs[bs].replay()
        first = None
        for i, n in enumerate(plan.prefill_lengths):
            prompt = _prompt(i, n, vocab)
            first = first or prompt
            add(prompt, _params(i, vocab))
        if plan.prefill_lengths:  # a synchronous step: penalties and logprobs need host state
            add(_prompt(99, 2, vocab), SamplingParams(max_tokens=MAX_NEW, repetition_penalty=1.1,
                                                      frequency_penalty=0.1, logprobs=2, ignore_eos=True))
        _drain(engine)
        short = min(SHORT, max(1, engine.max_model_len - MAX_NEW - 2))
        reuse = 2 * config.page_size + 3 <= engine.max_model_len - MAX_NEW - 2
        for b in plan.decode_batches:
            prompts = [_prompt(1000 + b + j, short, vocab) for j in range(b)]
            if reuse and first is not None and len(first) > 2 * config.page_size and b > 1:
                prompts[-1] = first[:2 * config.page_size] + prompts[-1][:3]  # extends over a cached prefix
            half = (b + 1) // 2
            for j in range(half):
                add(prompts[j], _params(j, vocab))
            if b > 1:
                engine.step()  # prefill the first half; the second half's prefill then mixes with its decodes
            for j in range(half, b):
                add(prompts[j], _params(j, vocab))
            _drain(engine)
    if engine._requests:
        raise RuntimeError(f"warm-up left requests behind: {sorted(engine._requests)[:3]}")
    engine.reset_prefix_cache()
    engine.pool.reset()
    engine.reset_counters()
    engine.last_schedule = []
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    engine.check_idle_integrity()
    log.info("warm-up: %d prefill lengths %s, decode batches %s in %.1f s", len(plan.prefill_lengths),
             list(plan.prefill_lengths), list(plan.decode_batches), time.monotonic() - started)

"""vLLM's side of `bench.gpu_engine --sections p`: the same 32,768-token prompts, offline, time
to first token (max_tokens=1), median of 3 after a warm-up prompt, prefix caching off (the
prompts differ anyway). Writes {"vllm": {...}} to $OUT/vllm_long.json, which section p reads.

Runs in vLLM's own environment (its carried packages on PYTHONPATH, see docs/gpu_peer.md), so it
imports nothing of Baton's; `long_prompts` repeats bench/gpu_long_context.py's draw exactly.

    PYTHONPATH=/tmp/vsite VLLM_USE_FLASHINFER_SAMPLER=0 python3 bench/vllm_long_prefill.py /tmp/m8b [LENGTH]
"""
import json
import os
import sys
import time

import numpy as np


def long_prompts(length: int, count: int = 4, vocab: int = 128000) -> list[list[int]]:
    rng = np.random.default_rng(17)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


def main() -> None:
    from vllm import LLM, SamplingParams
    model = sys.argv[1] if len(sys.argv) > 1 else "/tmp/m8b"
    length = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    prompts = long_prompts(length)
    llm = LLM(model=model, skip_tokenizer_init=True, gpu_memory_utilization=0.85, max_model_len=length + 64,
              enable_prefix_caching=False, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
    times = []
    for prompt in prompts[1:]:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    ttft = float(np.median(times))
    result = {"prompt_tokens": length, "ttft_s": ttft, "times_s": times, "tok_s": length / ttft}
    try:
        result["max_num_batched_tokens"] = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    except AttributeError:
        pass
    out = os.path.join(os.environ.get("OUT", "/tmp"), "vllm_long.json")
    with open(out, "w") as f:
        json.dump({"vllm": result}, f, indent=1)
    print("vllm_long " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

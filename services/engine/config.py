"""Engine configuration: one frozen dataclass, a doc line per field, validated on construction.

The CLI flags of `baton generate` / `baton serve` are generated from these fields
(`services.common.dataclass_flags`), so the doc line under each field is also its `--help`.
Names follow SGLang's server arguments where one exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

SchedulePolicy = Literal["fcfs", "lpm", "priority"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


def cuda_graph_batch_sizes(max_bs: int) -> list[int]:
    """The captured decode batch sizes up to a largest one (SGLang's): 1, 2, 4, 8, then every 8."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 8))
    if max_bs >= 1 and sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine instance (model, memory, batching)."""

    model: str = ""
    """Path to a Hugging Face model folder (config.json + safetensors + tokenizer); empty: the embedded SmolLM2-135M-Instruct."""
    device: str = "auto"
    """Where the model runs: cpu, cuda, cuda:N, or auto (CUDA when available)."""
    dtype: DType = "auto"
    """Weight and activation dtype; auto is float32 on CPU and the model's own dtype (bf16 if float32) on GPU."""
    page_size: int = 16
    """Tokens per KV-cache block (page); the radix cache shares whole pages."""
    kv_cache_tokens: Optional[int] = None
    """KV pool size in tokens; default: from --mem-fraction-static on GPU, 16384 on CPU."""
    mem_fraction_static: float = 0.85
    """Fraction of GPU memory for weights plus KV pool (GPU only)."""
    max_running_requests: int = 256
    """Most requests in the running batch at once."""
    chunked_prefill_size: int = 2048
    """Most prompt tokens prefilled per request per step; -1 disables chunking."""
    max_num_batched_tokens: int = 4096
    """Token budget of one engine step (decode tokens plus prefill chunks)."""
    schedule_policy: SchedulePolicy = "fcfs"
    """Order of admitting waiting requests: fcfs, lpm (longest cached prefix first), or priority."""
    disable_radix_cache: bool = False
    """Turn off prefix caching (every prompt is computed in full)."""
    max_model_len: Optional[int] = None
    """Longest prompt + completion in tokens; default: the model's max_position_embeddings."""
    num_threads: int = 0
    """torch CPU threads for this process; 0 keeps torch's default."""
    random_seed: int = 0
    """Seed of the engine's default random generator (requests without their own seed)."""
    disable_cuda_graph: bool = False
    """Run every decode step eagerly on the GPU instead of replaying captured CUDA graphs."""
    cuda_graph_max_bs: int = 256
    """Largest decode batch captured as a CUDA graph; captured sizes are 1, 2, 4, 8, then every 8 up to it (capped by max_running_requests)."""
    skip_tokenizer_init: bool = False
    """Return token ids only: outputs are not detokenized (text stays empty) and stop strings are refused (vLLM's name)."""
    disable_overlap_schedule: bool = False
    """Run every step synchronously; by default (CUDA only) the host schedules and launches step N+1 before reading step N's tokens back (steps with grammar, penalty or logprobs requests always run synchronously)."""

    def __post_init__(self) -> None:
        checks = [
            (self.page_size >= 1, "page_size must be at least 1"),
            (self.kv_cache_tokens is None or self.kv_cache_tokens >= self.page_size,
             "kv_cache_tokens must hold at least one page"),
            (0.0 < self.mem_fraction_static < 1.0, "mem_fraction_static must be in (0, 1)"),
            (self.max_running_requests >= 1, "max_running_requests must be at least 1"),
            (self.chunked_prefill_size == -1 or self.chunked_prefill_size >= 1,
             "chunked_prefill_size must be -1 (off) or positive"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be positive"),
            (self.schedule_policy in ("fcfs", "lpm", "priority"), "schedule_policy must be fcfs, lpm or priority"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype must be auto, float32, bfloat16 or float16"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be at least 2"),
            (self.num_threads >= 0, "num_threads must be non-negative"),
            (self.cuda_graph_max_bs >= 0, "cuda_graph_max_bs must be non-negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def cuda_graph_batch_sizes(self) -> list[int]:
        """The decode batch sizes captured as CUDA graphs (empty when graphs are off)."""
        if self.disable_cuda_graph:
            return []
        return cuda_graph_batch_sizes(min(self.cuda_graph_max_bs, self.max_running_requests))

    @property
    def prefill_chunk(self) -> int:
        """Most prompt tokens one request may prefill in one step."""
        if self.chunked_prefill_size == -1:
            return 1 << 30
        return self.chunked_prefill_size

"""Engine configuration: one frozen dataclass, a doc line per field, validated on construction.

The batching fields left None mean "by device": `device_defaults.resolve_config` fills them
once at engine construction (from the device type and GPU memory), and everything in the
engine reads that resolved config.

The CLI flags of `baton generate` / `baton serve` are generated from these fields
(`services.common.dataclass_flags`), so the doc line under each field is also its `--help`.
Names follow SGLang's server arguments where one exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

SchedulePolicy = Literal["fcfs", "lpm", "priority"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
KVCacheDType = Literal["auto", "fp8_e4m3"]


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
    kv_cache_dtype: KVCacheDType = "auto"
    """KV-cache element type: auto (the activation dtype) or fp8_e4m3 (float8 e4m3 with per-layer, per-head scales from the checkpoint's k_scale / v_scale or a calibration forward at start; twice the tokens in the same memory; docs/kv_cache.md)."""
    page_size: int = 16
    """Tokens per KV-cache block (page); the radix cache shares whole pages."""
    kv_cache_tokens: Optional[int] = None
    """KV pool size in tokens; default: from --mem-fraction-static on GPU, 16384 on CPU."""
    mem_fraction_static: float = 0.85
    """This process's share of the GPU's total memory for weights, KV pool and activations (GPU only); e.g. 0.42 each for two workers on one GPU."""
    max_running_requests: Optional[int] = None
    """Most requests in the running batch at once; default: by device (1024 on a GPU of 70 GiB or more, else 256)."""
    chunked_prefill_size: Optional[int] = None
    """Most prompt tokens prefilled per request per step; -1 disables chunking; default: by device (8192 on a GPU of 70 GiB or more, else 2048)."""
    max_num_batched_tokens: Optional[int] = None
    """Token budget of one engine step (decode tokens plus prefill chunks); default: by device (8192 on a GPU of 70 GiB or more, 2048 on a smaller one, 4096 on CPU)."""
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
    cuda_graph_max_bs: Optional[int] = None
    """Largest decode batch captured as a CUDA graph; captured sizes are 1, 2, 4, 8, then every 8 up to it (capped by max_running_requests); default: by device (512 on a GPU of 70 GiB or more, else 256)."""
    piecewise_cuda_graph_max_tokens: int = 512
    """Prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs (everything but attention; CUDA only; 0 or disable_cuda_graph: eager)."""
    skip_tokenizer_init: bool = False
    """Return token ids only: outputs are not detokenized (text stays empty) and stop strings are refused (vLLM's name)."""
    disable_overlap_schedule: bool = False
    """Run every step synchronously; by default (CUDA only) the host schedules and launches step N+1 before reading step N's tokens back (steps with grammar, penalty or logprobs requests always run synchronously)."""
    skip_warmup: bool = False
    """Skip the start-up warm-up steps (CUDA only; they compile every kernel variant serving uses before the engine takes requests)."""
    log_stats_interval_s: float = 10.0
    """Seconds between a worker's engine-stats log lines (steps, step time, tokens per step, batch and queue; vLLM's periodic stats line); 0: none."""
    tp_size: int = 1
    """Tensor-parallel ranks (--tp): one process per rank, each on its own GPU (cuda:0..N-1 of the visible ones) or CPU (gloo); heads split evenly (docs/parallel.md)."""

    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"tp_size": ("--tp",)}
    """Extra spellings of some flags (services.common.dataclass_flags)."""

    def __post_init__(self) -> None:
        checks = [
            (self.page_size >= 1, "page_size must be at least 1"),
            (self.kv_cache_tokens is None or self.kv_cache_tokens >= self.page_size,
             "kv_cache_tokens must hold at least one page"),
            (0.0 < self.mem_fraction_static < 1.0, "mem_fraction_static must be in (0, 1)"),
            (self.max_running_requests is None or self.max_running_requests >= 1,
             "max_running_requests must be at least 1"),
            (self.chunked_prefill_size is None or self.chunked_prefill_size == -1 or self.chunked_prefill_size >= 1,
             "chunked_prefill_size must be -1 (off) or positive"),
            (self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             "max_num_batched_tokens must be positive"),
            (self.schedule_policy in ("fcfs", "lpm", "priority"), "schedule_policy must be fcfs, lpm or priority"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype must be auto, float32, bfloat16 or float16"),
            (self.kv_cache_dtype in ("auto", "fp8_e4m3"), "kv_cache_dtype must be auto or fp8_e4m3"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be at least 2"),
            (self.num_threads >= 0, "num_threads must be non-negative"),
            (self.tp_size >= 1, "tp_size must be at least 1"),
            (self.log_stats_interval_s >= 0, "log_stats_interval_s must be non-negative"),
            (self.cuda_graph_max_bs is None or self.cuda_graph_max_bs >= 0, "cuda_graph_max_bs must be non-negative"),
            (self.piecewise_cuda_graph_max_tokens >= 0, "piecewise_cuda_graph_max_tokens must be non-negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_resolved(self) -> bool:
        """True once no field is left "by device" (None): what `device_defaults.resolve_config` returns."""
        return None not in (self.max_running_requests, self.chunked_prefill_size, self.max_num_batched_tokens,
                            self.cuda_graph_max_bs)

    def require_resolved(self) -> None:
        """Raise ValueError while a by-device field is still None."""
        if not self.is_resolved:
            raise ValueError("this EngineConfig still has by-device (None) fields: "
                             "resolve it first (device_defaults.resolve_config)")

    @property
    def cuda_graph_batch_sizes(self) -> list[int]:
        """The decode batch sizes captured as CUDA graphs (empty when graphs are off); resolved configs only."""
        self.require_resolved()
        if self.disable_cuda_graph:
            return []
        return cuda_graph_batch_sizes(min(self.cuda_graph_max_bs, self.max_running_requests))

    @property
    def prefill_chunk(self) -> int:
        """Most prompt tokens one request may prefill in one step; resolved configs only."""
        self.require_resolved()
        if self.chunked_prefill_size == -1:
            return 1 << 30
        return self.chunked_prefill_size

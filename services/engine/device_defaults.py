"""Batching defaults by device: what `EngineConfig`'s "by device" (None) fields become.

Four fields are left None unless the user sets them: `max_running_requests`,
`max_num_batched_tokens`, `chunked_prefill_size` and `cuda_graph_max_bs`. `resolve_config`
fills them once, at engine construction, from the device type and the GPU's total memory
(`batch_defaults`, a pure function, unit-tested on CPU with given memory sizes); the engine
reads only the resolved config.

| device                     | running | step budget | prefill chunk | graphs up to |
|----------------------------|---------|-------------|---------------|--------------|
| CPU                        | 256     | 4,096       | 2,048         | 256 (unused) |
| GPU under 70 GiB           | 256     | 2,048       | 2,048         | 256          |
| GPU of 70 GiB or more      | 1,024   | 8,192       | 8,192         | 512          |

Sources:
- vLLM 0.26 `EngineArgs` (`vllm/engine/arg_utils.py`, `get_batch_defaults`, the former
  `_set_default_args`), OpenAI API server context: on a device of at least 70 GiB (H100,
  H200, MI300x; vLLM also leaves out the A100 by name, which this pure function of memory
  does not) `max_num_batched_tokens` 8192 and `max_num_seqs` 1024, else 2048 and 256. The
  offline `LLM` class gets a larger budget there (16384 / 8192); we take the serving numbers
  since what is measured against `vllm serve` is serving. vLLM v1 chunks prefills by the
  step budget itself, so its chunk equals its budget.
- vLLM `VllmConfig._set_cudagraph_sizes`: the largest captured decode batch is
  min(2 * max_num_seqs, 512), capped by the step budget: 512 in both tiers (ours is also
  capped by `max_running_requests`, so 256 below 70 GiB).
- SGLang `ServerArgs._handle_gpu_memory_settings`: `chunked_prefill_size` 2048 under 35 GiB,
  4096 under 60 GiB, 8192 up to 160 GiB (H100, H200), 16384 above (B200, MI300); the
  chunk of the >= 70 GiB tier agrees with it (and with vLLM's budget). SGLang's 16k tier is
  not taken: it would double the step budget (and each prefill step's stall of the decodes)
  against vLLM 0.26's serving default, the comparison target.
- CPU: the engine's own defaults from before this table existed (tuned on 2 cores), unchanged.

Measured on an H200 at 8 req/s (issue 11): the CPU-tuned numbers on the GPU gave 0.38x
`vllm serve`'s goodput; the >= 70 GiB row's numbers were level with it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from baton.services.engine.config import EngineConfig

GIB = 1 << 30
LARGE_GPU_BYTES = 70 * GIB
"""GPUs with at least this much memory (H100, H200, ...) get the large defaults (vLLM's threshold)."""


@dataclass(frozen=True)
class BatchDefaults:
    """The batching numbers a device gets when the user leaves them unset."""

    max_running_requests: int
    """Most requests in the running batch."""
    max_num_batched_tokens: int
    """Token budget of one step."""
    chunked_prefill_size: int
    """Most prompt tokens one request prefills per step."""
    cuda_graph_max_bs: int
    """Largest decode batch captured as a CUDA graph."""


CPU_DEFAULTS = BatchDefaults(max_running_requests=256, max_num_batched_tokens=4096,
                             chunked_prefill_size=2048, cuda_graph_max_bs=256)
SMALL_GPU_DEFAULTS = BatchDefaults(max_running_requests=256, max_num_batched_tokens=2048,
                                   chunked_prefill_size=2048, cuda_graph_max_bs=256)
LARGE_GPU_DEFAULTS = BatchDefaults(max_running_requests=1024, max_num_batched_tokens=8192,
                                   chunked_prefill_size=8192, cuda_graph_max_bs=512)
BY_DEVICE_FIELDS = tuple(BatchDefaults.__dataclass_fields__)
"""The EngineConfig fields whose None means "by device"."""


def batch_defaults(device_type: str, total_memory_bytes: int = 0) -> BatchDefaults:
    """The defaults of a device: `device_type` is torch's ("cpu", "cuda", ...), `total_memory_bytes`
    the GPU's total memory (ignored off CUDA; 0 when unknown, which gets the small-GPU row)."""
    if device_type != "cuda":
        return CPU_DEFAULTS
    if total_memory_bytes >= LARGE_GPU_BYTES:
        return LARGE_GPU_DEFAULTS
    return SMALL_GPU_DEFAULTS


def resolve_config(config: EngineConfig, device_type: str, total_memory_bytes: int = 0) -> EngineConfig:
    """`config` with every by-device field the user left None set from `batch_defaults`
    (fields the user set are kept); the result is what the engine reads."""
    defaults = batch_defaults(device_type, total_memory_bytes)
    chosen = {name: getattr(defaults, name) for name in BY_DEVICE_FIELDS if getattr(config, name) is None}
    return replace(config, **chosen) if chosen else config


def device_total_memory(device) -> int:
    """Total memory of a CUDA device in bytes; 0 for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(device).total_memory)

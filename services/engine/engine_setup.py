"""Building an engine's parts from its config: device, dtype, tokenizer, weights, KV pool.

Owns start-up decisions: which model folder (the embedded default when none is given),
the dtype, the KV-cache element type and, for fp8, its scales (`kv_scales`), the by-device
batching defaults (`device_defaults.resolve_config`: the config every part is built from),
how many KV blocks fit (a token budget on CPU; on CUDA this process's share of the GPU,
`gpu_memory`), and the max context length.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from baton.services.engine.attention.base import AttentionBackend
from baton.services.engine.attention.torch_cpu import TorchAttentionBackend
from baton.services.engine.kv.block_pool import BlockPool
from baton.services.engine.config import EngineConfig
from baton.services.engine.device_defaults import device_total_memory, resolve_config
from baton.services.engine.kv.fp8 import is_fp8, kv_storage_dtype
from baton.services.engine.kv.kv_cache import KVCache, KVLayout
from baton.services.engine.runner.model_runner import ModelRunner
from baton.services.engine.models.loader import load_model
from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.kv.null_cache import NullPrefixCache
from baton.services.engine.kv.prefix_cache import PrefixCache
from baton.services.engine.kv.radix_cache import RadixCache
from baton.services.engine.scheduling.scheduler import Scheduler

CPU_DEFAULT_KV_TOKENS = 16384
log = logging.getLogger(__name__)


@dataclass
class EngineParts:
    """Everything an `Engine` is made of."""

    config: EngineConfig
    """The resolved config (no by-device field left None): what the engine reads."""
    model_path: Path
    model_config: ModelConfig
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    kv_cache: KVCache
    backend: AttentionBackend
    pool: BlockPool
    cache: PrefixCache
    """The radix cache, or the null cache when `disable_radix_cache` is set."""
    scheduler: Scheduler
    runner: ModelRunner
    max_model_len: int
    eos_token_ids: tuple[int, ...]


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return device


def resolve_dtype(config: EngineConfig, device: torch.device, model_dtype: str) -> torch.dtype:
    """--dtype auto: float32 on CPU; on GPU the model's dtype, bf16 for float32 checkpoints."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype != "auto":
        return names[config.dtype]
    if device.type == "cpu" or model_dtype not in ("bfloat16", "float16"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return names[model_dtype]


def resolve_model_path(config: EngineConfig) -> Path:
    """The model folder: --model, or the embedded default (converted on first use)."""
    if config.model:
        path = Path(config.model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"--model {config.model}: no such folder")
        return path
    from baton.services.engine.default_model import ensure_default_model
    return ensure_default_model()


def kv_cache_tokens(config: EngineConfig, layout_bytes_per_token: int, device: torch.device,
                    model: Any = None, dtype: torch.dtype = torch.float32, max_model_len: int = 0,
                    kv_dtype: torch.dtype | None = None) -> int:
    """KV pool size in tokens: the explicit budget; 16384 on CPU; on CUDA what fits in this
    process's share of the GPU once the weights and the profiled largest step are counted,
    divided by `layout_bytes_per_token` (which counts the cache's element size: an fp8 cache,
    `kv_dtype`, holds twice the tokens of a bf16 one in the same bytes)."""
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    if device.type != "cuda":
        return CPU_DEFAULT_KV_TOKENS
    from baton.services.engine import gpu_memory
    total = device_total_memory(device)
    gpu_memory.check_share_holds(total, config.mem_fraction_static, torch.cuda.memory_reserved(device))
    cfg = model.config
    profile = gpu_memory.profile_step_memory(
        model, dtype, device, config.page_size, max_model_len, config.max_num_batched_tokens, config.prefill_chunk,
        config.max_running_requests,
        lambda kv: make_attention_backend(kv, cfg.num_heads, cfg.head_dim, device), kv_dtype=kv_dtype)
    sizes = config.cuda_graph_batch_sizes
    graphs = 0
    if sizes and getattr(model, "fused", False):  # graphs need the fused model (and the Triton backend)
        width = -(-max_model_len // config.page_size)
        graphs = gpu_memory.graph_reserve_bytes(max(sizes), cfg.vocab_size, model.lm_head.weight.element_size(),
                                                width, profile)
    free, _ = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    available = gpu_memory.kv_pool_bytes(total, config.mem_fraction_static, held, profile.activation_bytes,
                                         graphs, free=free)
    if available < layout_bytes_per_token * config.page_size:
        raise ValueError("no GPU memory left for one KV page in this process's share; raise --mem-fraction-static")
    return int(available // layout_bytes_per_token)


def check_fp8_device(device: torch.device) -> None:
    """ValueError on a GPU whose Triton has no float8 e4m3 (compute capability below 8.9)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--kv-cache-dtype fp8_e4m3 needs a GPU of compute capability 8.9 or newer (Ada, "
                         f"Hopper); this one is {major}.{minor}: use --kv-cache-dtype auto")


def load_tokenizer(path: Path) -> Any:
    """The model folder's Hugging Face tokenizer."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def make_attention_backend(kv_cache: KVCache, num_heads: int, head_dim: int,
                           device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA when Triton imports; the torch reference backend otherwise."""
    if device.type == "cuda":
        try:
            from baton.services.engine.attention.triton_backend import TritonAttentionBackend
        except ImportError:
            pass
        else:
            return TritonAttentionBackend(kv_cache, num_heads, head_dim)
    return TorchAttentionBackend(kv_cache, num_heads, head_dim)


def build_engine_parts(config: EngineConfig) -> EngineParts:
    """Load the model and size the KV cache as the config says (`tp_size` > 1: rank 0 of a
    tensor-parallel engine, which starts the other ranks: parallel/launch.py)."""
    if config.tp_size > 1:
        from baton.services.engine.parallel.launch import build_tp_engine_parts
        return build_tp_engine_parts(config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.random_seed)
    path = resolve_model_path(config)
    model_config = ModelConfig.from_folder(path)
    device = resolve_device(config.device)
    config = resolve_config(config, device.type, device_total_memory(device))
    dtype = resolve_dtype(config, device, model_config.torch_dtype)
    tokenizer = load_tokenizer(path)
    model = load_model(path, model_config, dtype, device)
    if device.type == "cuda" and model.fused and dtype in (torch.bfloat16, torch.float16):
        from baton.services.engine.models.gemv_tuning import tune_model
        model.gemv_choices = tune_model(model)  # cuBLAS or Triton per projection, measured on this GPU
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the KV pool is sized from what this process holds: return loader leftovers
    max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    kv_dtype = kv_storage_dtype(config.kv_cache_dtype, dtype)
    scales, scales_source = (), ""
    if is_fp8(kv_dtype):
        check_fp8_device(device)
        from baton.services.engine.kv_scales import resolve_kv_scales
        scales, scales_source = resolve_kv_scales(
            path, model, tokenizer, device, dtype, config.page_size, max_model_len,
            lambda kv: make_attention_backend(kv, model_config.num_heads, model_config.head_dim, device))
        log.info("fp8 KV cache: scales from the %s (%.3g..%.3g)", scales_source, min(scales), max(scales))
    probe = KVLayout(model_config.num_layers, 1, config.page_size, model_config.num_kv_heads,
                     model_config.head_dim, kv_dtype, scales)
    tokens = kv_cache_tokens(config, probe.bytes_per_token, device, model, dtype, max_model_len, kv_dtype)
    layout = KVLayout(model_config.num_layers, max(1, tokens // config.page_size), config.page_size,
                      model_config.num_kv_heads, model_config.head_dim, kv_dtype, scales)
    kv_cache = KVCache(layout, device)
    kv_cache.scales_source = scales_source
    backend = make_attention_backend(kv_cache, model_config.num_heads, model_config.head_dim, device)
    pool = BlockPool(layout.num_blocks)
    cache_class = NullPrefixCache if config.disable_radix_cache else RadixCache
    cache = cache_class(pool, config.page_size)
    eos = list(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return EngineParts(
        config=config, model_path=path, model_config=model_config, tokenizer=tokenizer, device=device, dtype=dtype,
        kv_cache=kv_cache, backend=backend, pool=pool, cache=cache,
        scheduler=Scheduler(config, pool, cache),
        runner=ModelRunner(model, backend, config.page_size, device, max_model_len=max_model_len,
                           cuda_graph_bs=config.cuda_graph_batch_sizes if device.type == "cuda" else (),
                           max_rows=config.max_running_requests,
                           piecewise_max_tokens=0 if config.disable_cuda_graph else config.piecewise_cuda_graph_max_tokens),
        max_model_len=max_model_len, eos_token_ids=tuple(eos),
    )

"""What every rank of a tensor-parallel engine builds, in the same order: its device, its shard
of the model and a KV cache of its KV heads.

Every rank runs `build_rank` at the same time and with the same config, because start-up runs
the model too: on CUDA the KV pool is sized by a profile forward (whose collectives must pair up
across the ranks) and the ranks then agree on the smallest block count, so rank 0's scheduler
never hands out a block another rank lacks. Refused with a clear error: heads or MLP width not
divisible by the TP size, vision-language models and an fp8 KV cache (not built for TP yet).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.services.engine.attention.base import AttentionBackend
from baton.services.engine.config import EngineConfig
from baton.services.engine.device_defaults import device_total_memory, resolve_config
from baton.services.engine.engine_setup import kv_cache_tokens, make_attention_backend, resolve_dtype
from baton.services.engine.kv.fp8 import is_fp8, kv_storage_dtype
from baton.services.engine.kv.kv_cache import KVCache, KVLayout
from baton.services.engine.models.loader import load_model
from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.parallel.group import TPGroup
from baton.services.engine.parallel.layers import TPLlamaForCausalLM, check_tp, shard_config, shard_tensor

log = logging.getLogger(__name__)


@dataclass
class RankParts:
    """One rank's share of the engine."""

    config: EngineConfig
    """The resolved config (no piecewise graphs: TP prefill steps run eagerly)."""
    model_config: ModelConfig
    """The whole model's shape (what the scheduler and sampler see)."""
    device: torch.device
    dtype: torch.dtype
    model: TPLlamaForCausalLM
    """This rank's shard (its `config` is the shard config, with the whole vocabulary)."""
    kv_cache: KVCache
    """The KV heads of this rank only."""
    backend: AttentionBackend
    max_model_len: int

    @property
    def graph_sizes(self) -> list[int]:
        """The decode batch sizes every rank captures (none on the CPU)."""
        return self.config.cuda_graph_batch_sizes if self.device.type == "cuda" else []


def rank_device(name: str, rank: int) -> torch.device:
    """Rank r's device: cuda:r (cuda:N+r for --device cuda:N; auto is CUDA when available), else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available")
    base = (torch.device(name).index or 0) if name.startswith("cuda:") else 0
    index = base + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"tensor-parallel rank {rank} needs cuda:{index} but only {torch.cuda.device_count()} "
                         f"GPUs are visible (CUDA_VISIBLE_DEVICES); --tp N needs N GPUs per worker")
    return torch.device("cuda", index)


def check_supported(config: EngineConfig, model_config: ModelConfig) -> None:
    """ValueError for what tensor parallelism does not cover (before any rank loads weights)."""
    check_tp(model_config, config.tp_size)
    if model_config.multimodal:
        raise ValueError(f"--tp {config.tp_size}: vision-language models ({model_config.multimodal}) are not "
                         f"built for tensor parallelism yet; use --tp 1")
    if config.kv_cache_dtype != "auto":
        raise ValueError(f"--tp {config.tp_size} with --kv-cache-dtype {config.kv_cache_dtype}: an fp8 KV cache "
                         f"is not built for tensor parallelism yet (its scales are per KV head); use auto")


def build_rank(config: EngineConfig, path: Path, group: TPGroup) -> RankParts:
    """Load this rank's shard and size its KV cache (every rank calls this together)."""
    model_config = ModelConfig.from_folder(path)
    check_supported(config, model_config)
    device = group.device
    config = resolve_config(config, device.type, device_total_memory(device))
    config = dataclasses.replace(config, piecewise_cuda_graph_max_tokens=0)  # prefill steps run eagerly under TP
    dtype = resolve_dtype(config, device, model_config.torch_dtype)
    local = shard_config(model_config, group.size)
    model = load_model(path, local, dtype, device,
                       build=lambda cfg, fused: TPLlamaForCausalLM(cfg, fused, group),
                       shard=lambda name, t: shard_tensor(name, t, group.rank, group.size, model_config.vocab_size))
    if device.type == "cuda" and model.fused and dtype in (torch.bfloat16, torch.float16):
        from baton.services.engine.models.gemv_tuning import tune_model
        model.gemv_choices = tune_model(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                        model_config.max_position_embeddings)
    kv_dtype = kv_storage_dtype(config.kv_cache_dtype, dtype)
    assert not is_fp8(kv_dtype)
    probe = KVLayout(local.num_layers, 1, config.page_size, local.num_kv_heads, local.head_dim, kv_dtype)
    tokens = kv_cache_tokens(config, probe.bytes_per_token, device, model, dtype, max_model_len, kv_dtype)
    blocks = group.min_int(max(1, tokens // config.page_size))
    layout = KVLayout(local.num_layers, blocks, config.page_size, local.num_kv_heads, local.head_dim, kv_dtype)
    kv_cache = KVCache(layout, device)
    backend = make_attention_backend(kv_cache, local.num_heads, local.head_dim, device)
    log.info("tensor-parallel rank %d/%d on %s: %d of %d query heads, %d of %d KV heads, %d KV blocks",
             group.rank, group.size, device, local.num_heads, model_config.num_heads, local.num_kv_heads,
             model_config.num_kv_heads, blocks)
    return RankParts(config=config, model_config=model_config, device=device, dtype=dtype, model=model,
                     kv_cache=kv_cache, backend=backend, max_model_len=max_model_len)

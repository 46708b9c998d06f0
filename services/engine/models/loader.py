"""Loading a Hugging Face safetensors folder into our model modules.

Owns: finding the weight files (single file or sharded with `model.safetensors.index.json`),
building the module without initialising random weights, copying each tensor in the
target dtype/device, and failing clearly on missing or unexpected tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from baton.services.engine.models.llama import LlamaForCausalLM
from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.models.rotary import inverse_frequencies
from baton.services.engine.models.vlm import language_tensor_name

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",
                    "self_attn.k_scale", "self_attn.v_scale", "self_attn.kv_scale")  # fp8 KV scales: kv_scales.py


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in a stable order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def fused_kernels_available(device: torch.device) -> bool:
    """True where the fused Triton decoder path runs: a CUDA device with Triton importable."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(folder: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               fused: bool | None = None, build: Callable[..., LlamaForCausalLM] | None = None,
               shard: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> LlamaForCausalLM:
    """Build the model for `cfg` and fill it with the folder's weights.

    `fused` (default: on CUDA with Triton) builds the fused-projection GPU model; the weights
    are allocated once, directly in `dtype` on `device`. Tensor parallelism (`parallel/`) passes
    `build` (its model class, called as `build(cfg, fused=...)`) and `shard` (Hugging Face name,
    full tensor -> this rank's part)."""
    folder = Path(folder)
    if fused is None:
        fused = fused_kernels_available(device)
    with torch.device("meta"):
        model = (build or LlamaForCausalLM)(cfg, fused=fused)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim).to(device)
    params = model.hf_tensors()
    loaded: set[str] = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for stored in f.keys():
                name = language_tensor_name(stored) if cfg.multimodal else stored
                if name is None or name.endswith(IGNORED_SUFFIXES):
                    continue
                if name not in params:
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue
                    raise ValueError(f"unexpected tensor {name!r} in {path.name}")
                tensor = f.get_tensor(stored)
                _copy_into(params[name], shard(name, tensor) if shard is not None else tensor, name)
                loaded.add(name)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"model folder {folder} lacks tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(dtype=param.dtype))

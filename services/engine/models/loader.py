"""Loading a Hugging Face safetensors folder into our model modules.

Owns: finding the weight files (single file or sharded with `model.safetensors.index.json`),
building the module without initialising random weights, copying each tensor in the
target dtype/device, and failing clearly on missing or unexpected tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from services.engine.models.llama import LlamaForCausalLM
from services.engine.models.model_config import ModelConfig
from services.engine.models.rotary import inverse_frequencies

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


def load_model(folder: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Build the model for `cfg` and fill it with the folder's weights."""
    folder = Path(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim).to(device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if name not in params:
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue
                    raise ValueError(f"unexpected tensor {name!r} in {path.name}")
                _copy_into(params[name], f.get_tensor(name), name)
                loaded.add(name)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"model folder {folder} lacks tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def _copy_into(param: torch.nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(dtype=param.dtype))

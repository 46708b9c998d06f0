"""What the engine reads from a vision-language model folder (LLaVA-1.5, Qwen2.5-VL).

Owns three mappings: the folder's config.json to the language model's `ModelConfig` (the
decoder is an ordinary Llama-family model read from `text_config`, or from the top level
in Qwen2.5-VL's flat layout); the checkpoint's tensor names to the language model's
(`language_model.model.X`, `model.language_model.X` -> `model.X`), skipping the vision
tensors; and the vision tensors' names to the vision modules' (`vision_tower.vision_model.X`
-> `vision_tower.X`, `model.visual.X` -> `visual.X`). Loading the vision part (tower and
projector) is `load_vision`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

_TEXT_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen2_5_vl_text": "Qwen2ForCausalLM", "qwen2_5_vl": "Qwen2ForCausalLM"}
_LANGUAGE_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                      ("language_model.lm_head.", "lm_head."))
_VISION_ROOTS = ("vision_tower.", "multi_modal_projector.", "visual.")


def read_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a model folder."""
    return json.loads((Path(folder) / "config.json").read_text())


def language_config(cls: Any, multimodal: str, raw: dict[str, Any], generation: Optional[dict[str, Any]]) -> Any:
    """The `ModelConfig` of a vision-language model's decoder."""
    text = dict(raw.get("text_config") or raw)
    text.pop("architectures", None)
    model_type = text.get("model_type") or ("llama" if multimodal == "llava" else "qwen2")
    if model_type not in _TEXT_FAMILY:
        raise ValueError(f"unsupported {multimodal} language model type {model_type!r}")
    text["architectures"] = [_TEXT_FAMILY[model_type]]
    if "text_config" in raw:  # the top level's tie (what transformers applies) wins over the nested one
        text["tie_word_embeddings"] = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    mrope: tuple[int, ...] = ()
    if multimodal == "qwen2_5_vl":
        params = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        mrope = tuple(int(s) for s in params.get("mrope_section") or (16, 24, 24))
        theta = params.get("rope_theta", text.get("rope_theta", 1000000.0))
        text.pop("rope_scaling", None)
        text["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    if text.get("eos_token_id") is None and raw.get("eos_token_id") is not None:
        text["eos_token_id"] = raw["eos_token_id"]
    image_token = raw.get("image_token_id", raw.get("image_token_index"))
    base = cls.from_dict(text, generation)
    if mrope and 2 * sum(mrope) != base.head_dim:
        raise ValueError(f"mrope_section {list(mrope)} does not cover head_dim {base.head_dim}")
    return dataclasses.replace(base, multimodal=multimodal, image_token_id=None if image_token is None
                               else int(image_token), mrope_section=mrope)


def language_tensor_name(name: str) -> Optional[str]:
    """The language model's name for a checkpoint tensor; None for a vision tensor."""
    for prefix, replacement in _LANGUAGE_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return None if vision_tensor_name(name) is not None else name


def vision_tensor_name(name: str) -> Optional[str]:
    """The vision modules' name for a checkpoint tensor; None for a language-model tensor."""
    if name.startswith("model.") and name[len("model."):].startswith(_VISION_ROOTS):
        name = name[len("model."):]
    if not name.startswith(_VISION_ROOTS):
        return None
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


def build_vision(multimodal: str, raw: dict[str, Any]) -> nn.Module:
    """The (uninitialised) vision modules of a family, from its config.json."""
    if multimodal == "llava":
        from baton.services.engine.models.llava import LlavaVision
        return LlavaVision(raw)
    if multimodal == "qwen2_5_vl":
        from baton.services.engine.models.qwen2_5_vl import Qwen25VLVision
        return Qwen25VLVision(raw)
    raise ValueError(f"no vision modules for {multimodal!r}")


def load_vision(folder: str | Path, multimodal: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The vision tower and projector of a model folder, filled with its weights."""
    from safetensors import safe_open

    from baton.services.engine.models.loader import weight_files
    folder = Path(folder)
    raw = read_config(folder)
    with torch.device("meta"):
        module = build_vision(multimodal, raw)
    module = module.to(dtype).to_empty(device=device)
    module.init_buffers()
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for stored in f.keys():
                name = vision_tensor_name(stored)
                if name is None:
                    continue
                if name not in params:
                    raise ValueError(f"unexpected vision tensor {stored!r} in {path.name}")
                tensor = f.get_tensor(stored)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"tensor {stored!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                with torch.no_grad():
                    params[name].copy_(tensor.to(dtype=params[name].dtype))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"model folder {folder} lacks vision tensors: {missing[:5]}")
    return module.eval()

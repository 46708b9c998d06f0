"""The architecture facts the engine needs, read from a Hugging Face `config.json`.

Owns the mapping from the many spellings Hugging Face configs use (rope_scaling vs
rope_parameters, head_dim present or derived, Qwen3's q/k norm) to one typed record, and
the refusal of architectures the engine does not implement.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

MULTIMODAL_ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
"""Vision-language architectures: their language model is read from `text_config` (models/vlm.py)."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters."""

    theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_type: str = "default"
    """default, linear, llama3 or yarn."""
    factor: float = 1.0
    """Scaling factor (linear, llama3, yarn)."""
    low_freq_factor: float = 1.0
    """Llama-3 scaling: wavelengths above original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Llama-3 scaling: wavelengths below original_max / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Llama-3 / YaRN scaling: the context length the model was trained on (the config's
    max_position_embeddings when it does not say, as transformers does)."""
    beta_fast: float = 32.0
    """YaRN: rotations per original window above which a frequency is kept (extrapolated)."""
    beta_slow: float = 1.0
    """YaRN: rotations per original window below which a frequency is divided by `factor`."""
    truncate: bool = True
    """YaRN: round the correction range outwards to whole dimensions."""
    attention_factor: float = 1.0
    """Multiplier of the cos / sin tables (YaRN's 0.1 ln(factor) + 1 unless the config sets it)."""


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder's shape."""

    family: str
    """llama, mistral, qwen2 or qwen3."""
    vocab_size: int
    """Rows of the embedding and logits width."""
    hidden_size: int
    """Model width."""
    intermediate_size: int
    """MLP width."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    head_dim: int
    """Width of one head."""
    rms_norm_eps: float
    """RMSNorm epsilon."""
    max_position_embeddings: int
    """Longest context the model supports."""
    tie_word_embeddings: bool
    """The output projection reuses the embedding matrix."""
    attention_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    qk_norm: bool
    """Per-head RMSNorm on q and k before rotary (Qwen3)."""
    sliding_window: Optional[int]
    """Attend only to the last this-many positions (Mistral); None for full attention."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Rotary embedding parameters."""
    torch_dtype: str = "float32"
    """The dtype the weights were saved in."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids from config.json / generation_config.json."""
    multimodal: Optional[str] = None
    """The vision-language family (llava, qwen2_5_vl) whose language model this is; None for text-only."""
    image_token_id: Optional[int] = None
    """The image placeholder token a vision-language model's prompt repeats once per image embedding."""
    mrope_section: tuple[int, ...] = ()
    """Multimodal rope (Qwen2.5-VL): rotary pairs given to the temporal, height and width positions."""

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        """Read config.json (and generation_config.json for EOS ids) from a model folder."""
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
        raw = json.loads(path.read_text())
        generation = folder / "generation_config.json"
        gen_raw = json.loads(generation.read_text()) if generation.is_file() else {}
        return cls.from_dict(raw, gen_raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: Optional[dict[str, Any]] = None) -> "ModelConfig":
        """Build from config.json contents; raises ValueError for unsupported architectures."""
        archs = raw.get("architectures") or []
        multimodal = next((MULTIMODAL_ARCHITECTURES[a] for a in archs if a in MULTIMODAL_ARCHITECTURES), None)
        if multimodal is not None:
            from baton.services.engine.models.vlm import language_config
            return language_config(cls, multimodal, raw, generation)
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            family = raw.get("model_type") if raw.get("model_type") in SUPPORTED_ARCHITECTURES.values() else None
        if family is None:
            raise ValueError(f"unsupported architecture {archs or raw.get('model_type')}; "
                             f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        heads = raw["num_attention_heads"]
        sliding = raw.get("sliding_window") if family == "mistral" or raw.get("use_sliding_window") else None
        return cls(
            family=family,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            sliding_window=sliding,
            rope=_rope_config(raw),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            eos_token_ids=_eos_ids(raw, generation or {}),
        )


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3, yarn")
    max_positions = int(raw.get("max_position_embeddings", 4096))
    original = int(params.get("original_max_position_embeddings") or max_positions)
    factor = params.get("factor")
    if factor is None:
        factor = max_positions / original if rope_type == "yarn" else 1.0
    factor = float(factor)
    attention_factor = 1.0
    if rope_type == "yarn":
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (generation.get("eos_token_id"), raw.get("eos_token_id")):
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)

"""The architecture facts the engine needs, read from a Hugging Face `config.json`.

Owns the mapping from the many spellings Hugging Face configs use (rope_scaling vs
rope_parameters, head_dim present or derived, Qwen3's q/k norm) to one typed record, and
the refusal of architectures the engine does not implement.
"""
from __future__ import annotations

import json
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
    """default, linear or llama3."""
    factor: float = 1.0
    """Scaling factor (linear, llama3)."""
    low_freq_factor: float = 1.0
    """Llama-3 scaling: wavelengths above original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Llama-3 scaling: wavelengths below original_max / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Llama-3 scaling: the context length the model was trained on."""


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
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (generation.get("eos_token_id"), raw.get("eos_token_id")):
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)

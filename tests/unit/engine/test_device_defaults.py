"""By-device batching defaults: the pure table by device type and GPU memory, resolving a
config (user-set fields kept), the CPU engine seeing exactly the old defaults, and the
Optional[int] fields going through the generated CLI flags."""
import argparse

import pytest

from baton.services.common.dataclass_flags import add_flags, from_args
from baton.services.engine.config import EngineConfig
from baton.services.engine.device_defaults import (BY_DEVICE_FIELDS, CPU_DEFAULTS, GIB, LARGE_GPU_DEFAULTS,
                                                   SMALL_GPU_DEFAULTS, batch_defaults, device_total_memory,
                                                   resolve_config)
from baton.services.engine.engine import Engine
from tests.helpers.tiny_models import make_tiny_model

H200 = 143771 * (1 << 20)  # what torch reports for an H200 (140.4 GiB)
H100 = 81559 * (1 << 20)
L4 = 22700 * (1 << 20)


def test_cpu_defaults_are_the_old_ones_whatever_the_memory():
    for memory in (0, 16 * GIB, H200):
        assert batch_defaults("cpu", memory) == CPU_DEFAULTS
    assert CPU_DEFAULTS.max_running_requests == 256 and CPU_DEFAULTS.max_num_batched_tokens == 4096
    assert CPU_DEFAULTS.chunked_prefill_size == 2048 and CPU_DEFAULTS.cuda_graph_max_bs == 256


@pytest.mark.parametrize("memory", [H100, H200, 70 * GIB, 192 * GIB])
def test_large_gpus_serve_like_vllm(memory):
    d = batch_defaults("cuda", memory)
    assert d == LARGE_GPU_DEFAULTS
    assert d.max_running_requests >= 1024 and d.max_num_batched_tokens >= 8192
    assert d.chunked_prefill_size >= 8192 and d.cuda_graph_max_bs >= 512


@pytest.mark.parametrize("memory", [0, L4, 40 * GIB, 70 * GIB - 1])
def test_smaller_gpus_get_vllms_small_row(memory):
    assert batch_defaults("cuda", memory) == SMALL_GPU_DEFAULTS == batch_defaults("cuda", memory)
    assert SMALL_GPU_DEFAULTS.max_num_batched_tokens == 2048 and SMALL_GPU_DEFAULTS.max_running_requests == 256


def test_resolve_fills_only_what_the_user_left_unset():
    config = EngineConfig(max_running_requests=64, chunked_prefill_size=-1)
    assert not config.is_resolved
    resolved = resolve_config(config, "cuda", H200)
    assert resolved.is_resolved
    assert (resolved.max_running_requests, resolved.chunked_prefill_size) == (64, -1)
    assert (resolved.max_num_batched_tokens, resolved.cuda_graph_max_bs) == (8192, 512)
    assert resolved.cuda_graph_batch_sizes[-1] == 64  # capped by max_running_requests
    assert resolve_config(resolved, "cpu") is resolved  # nothing left to fill
    cpu = resolve_config(EngineConfig(), "cpu")
    assert {name: getattr(cpu, name) for name in BY_DEVICE_FIELDS} == vars(CPU_DEFAULTS)


def test_unresolved_configs_refuse_to_be_read_as_budgets():
    with pytest.raises(ValueError, match="resolve"):
        EngineConfig().prefill_chunk
    with pytest.raises(ValueError, match="resolve"):
        EngineConfig().cuda_graph_batch_sizes
    for bad in (dict(max_running_requests=0), dict(max_num_batched_tokens=0), dict(chunked_prefill_size=0),
                dict(cuda_graph_max_bs=-1)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


def test_cpu_engine_reads_the_resolved_config(tmp_path):
    engine = Engine(EngineConfig(model=str(make_tiny_model("llama", tmp_path)), kv_cache_tokens=256, num_threads=1))
    config = engine.config
    assert config.is_resolved and engine.scheduler.config is config
    assert (config.max_running_requests, config.max_num_batched_tokens, config.chunked_prefill_size,
            config.cuda_graph_max_bs) == (256, 4096, 2048, 256)
    assert device_total_memory("cpu") == 0


def test_optional_int_fields_are_flags_defaulting_to_by_device():
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, EngineConfig)
    assert from_args(EngineConfig, parser.parse_args([])) == EngineConfig()
    args = parser.parse_args(["--max-running-requests", "1024", "--max-num-batched-tokens", "8192",
                              "--chunked-prefill-size", "8192", "--cuda-graph-max-bs", "512", "--skip-warmup"])
    config = from_args(EngineConfig, args)
    assert config == EngineConfig(max_running_requests=1024, max_num_batched_tokens=8192, chunked_prefill_size=8192,
                                  cuda_graph_max_bs=512, skip_warmup=True)
    assert "by device" in parser.format_help()
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--max-running-requests", "many"])

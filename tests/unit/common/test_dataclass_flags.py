"""CLI flags generated from config dataclasses: names, types, choices, help, validation."""
import argparse

import pytest

from baton.services.common.dataclass_flags import add_flags, field_docs, from_args
from baton.services.engine.config import EngineConfig


def parse(argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, EngineConfig)
    return parser, parser.parse_args(argv)


def test_every_field_becomes_a_flag_with_its_doc_line_as_help():
    parser, _ = parse([])
    help_text = parser.format_help()
    docs = field_docs(EngineConfig)
    for name in ("page_size", "chunked_prefill_size", "schedule_policy", "disable_radix_cache", "mem_fraction_static"):
        assert "--" + name.replace("_", "-") in help_text
        assert docs[name]
    assert "longest cached prefix" in help_text


def test_values_are_typed_and_round_trip_into_the_config():
    _, args = parse(["--page-size", "8", "--schedule-policy", "lpm", "--disable-radix-cache",
                     "--kv-cache-tokens", "512", "--mem-fraction-static", "0.5"])
    config = from_args(EngineConfig, args)
    assert config == EngineConfig(page_size=8, schedule_policy="lpm", disable_radix_cache=True,
                                  kv_cache_tokens=512, mem_fraction_static=0.5)
    assert from_args(EngineConfig, parse([])[1]) == EngineConfig()


def test_bad_choice_and_bad_value_are_refused():
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, EngineConfig)
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--schedule-policy", "random"])
    _, args = parse(["--page-size", "0"])
    with pytest.raises(ValueError, match="page_size"):
        from_args(EngineConfig, args)

"""SamplingParams <-> baton.v1.SamplingParams: round trips, wire defaults, invalid values."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import BatonError, ErrorCode
from baton.services.worker.params_codec import sampling_params_from_proto, sampling_params_to_proto
from baton.services.engine import SamplingParams, StructuredOutputParams

STRUCTURED = [None, StructuredOutputParams(json='{"type": "object"}'), StructuredOutputParams(json_object=True),
              StructuredOutputParams(regex=r"\d+"), StructuredOutputParams(grammar='root ::= "a"')]

VARIANTS = [
    dict(),
    dict(n=3, max_tokens=None, min_tokens=2),
    dict(max_tokens=1),
    dict(temperature=0.0, top_k=1),
    dict(temperature=0.7, top_k=50, top_p=0.95, min_p=0.05),
    dict(temperature=1.3, top_k=0),
    dict(repetition_penalty=1.1, frequency_penalty=-0.5, presence_penalty=2.0),
    dict(seed=0),
    dict(seed=2**64 - 1),
    dict(stop=("\n", "END"), stop_token_ids=(2, 7), include_stop_str_in_output=True),
    dict(ignore_eos=True, logprobs=0),
    dict(logprobs=20, skip_special_tokens=False),
    dict(prompt_logprobs=0),
    dict(prompt_logprobs=5, prompt_logprobs_start=17, logprobs=1),
    dict(priority=-5),
    dict(priority=2**31 - 1, max_tokens=4096, min_tokens=4096),
]


def _same(a: SamplingParams, b: SamplingParams) -> bool:
    """Equal up to the two spellings of top_k "off" (0 and -1)."""
    def canonical(p: SamplingParams) -> SamplingParams:
        return dataclasses.replace(p, top_k=-1 if p.top_k == 0 else p.top_k)
    return canonical(a) == canonical(b)


@pytest.mark.parametrize("fields,structured", list(itertools.product(VARIANTS, STRUCTURED)))
def test_round_trip(fields: dict, structured) -> None:
    params = SamplingParams(**fields, structured_output=structured)
    msg = sampling_params_to_proto(params)
    back = sampling_params_from_proto(common_pb2.SamplingParams.FromString(msg.SerializeToString()))
    assert _same(back, params), (params, back)
    assert sampling_params_to_proto(back) == msg


def test_every_engine_field_is_mapped() -> None:
    fields = set(SamplingParams.__dataclass_fields__) - {"extra", "skip_special_tokens"}
    wire = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}
    assert fields - {"structured_output"} <= wire
    assert wire - fields == {"keep_special_tokens"}


def test_empty_message_means_engine_defaults() -> None:
    params = sampling_params_from_proto(common_pb2.SamplingParams())
    assert params == SamplingParams(max_tokens=None)  # unset max_tokens: up to the context length
    assert params.n == 1 and params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == -1
    assert params.seed is None and params.logprobs is None and params.structured_output is None
    assert params.skip_special_tokens


def test_wire_conventions() -> None:
    params = sampling_params_from_proto(common_pb2.SamplingParams(
        n=0, temperature=0.0, keep_special_tokens=True, logprobs=0, seed=0, top_k=-1))
    assert params.n == 1 and params.temperature == 0.0 and params.greedy
    assert params.skip_special_tokens is False and params.logprobs == 0 and params.seed == 0 and params.top_k == -1
    msg = sampling_params_to_proto(SamplingParams(max_tokens=None, temperature=1.0))
    assert not msg.HasField("max_tokens") and msg.HasField("temperature")
    assert not msg.HasField("seed") and not msg.HasField("logprobs") and not msg.HasField("structured_output")
    assert msg.top_k == 0 and msg.keep_special_tokens is False


def test_floats_come_back_as_written() -> None:
    for value in (0.1, 0.7, 0.95, 1e-5, 1.05, 0.333):
        msg = sampling_params_to_proto(SamplingParams(temperature=value, top_p=min(value, 1.0)))
        back = sampling_params_from_proto(msg)
        assert back.temperature == value and back.top_p == min(value, 1.0)


def test_json_object_false_is_no_constraint() -> None:
    msg = common_pb2.SamplingParams(structured_output=common_pb2.StructuredOutput(json_object=False))
    assert sampling_params_from_proto(msg).structured_output is None


@pytest.mark.parametrize("msg,needle", [
    (common_pb2.SamplingParams(temperature=-1.0), "temperature"),
    (common_pb2.SamplingParams(top_p=0.0), "top_p"),
    (common_pb2.SamplingParams(top_k=-7), "top_k"),
    (common_pb2.SamplingParams(max_tokens=0), "max_tokens"),
    (common_pb2.SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    (common_pb2.SamplingParams(logprobs=21), "logprobs"),
    (common_pb2.SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
    (common_pb2.SamplingParams(prompt_logprobs_start=3), "prompt_logprobs_start needs prompt_logprobs"),
    (common_pb2.SamplingParams(frequency_penalty=3.0), "frequency_penalty"),
    (common_pb2.SamplingParams(stop=[""]), "stop"),
    (common_pb2.SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
])
def test_invalid_values_are_invalid_request(msg, needle: str) -> None:
    with pytest.raises(BatonError) as info:
        sampling_params_from_proto(msg)
    assert info.value.code == ErrorCode.INVALID_REQUEST and needle in info.value.message


def test_values_that_do_not_fit_the_wire_are_invalid_request() -> None:
    for params in (SamplingParams(seed=-1), SamplingParams(priority=2**40)):
        with pytest.raises(BatonError) as info:
            sampling_params_to_proto(params)
        assert info.value.code == ErrorCode.INVALID_REQUEST

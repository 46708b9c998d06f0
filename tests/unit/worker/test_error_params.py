"""Worker-side 400s name the field in `param` (services/worker/params_codec.py), as HTTP's do, and
the name travels to the router in the error's trailing metadata (protos/errors.py)."""
from __future__ import annotations

import pytest

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import BatonError, ErrorCode, PARAM_METADATA_KEY
from baton.services.worker.params_codec import param_for, sampling_params_from_proto


@pytest.mark.parametrize("fields,param", [
    ({"top_p": 5.0}, "top_p"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": 3, "min_tokens": 5}, "min_tokens"),
    ({"logprobs": 50}, "logprobs"), ({"frequency_penalty": 9.0}, "frequency_penalty"),
    ({"prompt_logprobs_start": 3}, "prompt_logprobs_start"),
])
def test_refused_params_name_their_field(fields, param):
    with pytest.raises(BatonError) as excinfo:
        sampling_params_from_proto(common_pb2.SamplingParams(**fields))
    assert excinfo.value.code == ErrorCode.INVALID_REQUEST and excinfo.value.param == param


def test_engine_refusals_name_their_field():
    assert param_for("the prompt has 900 tokens; this model's context is 512 tokens") == "prompt"
    assert param_for("prompt token id 99999 is outside the vocabulary [0, 384)") == "prompt"
    assert param_for("stop strings need detokenization, which skip_tokenizer_init turns off") == "stop"
    assert param_for("no token can be sampled: the structured-output constraint allows none") == "response_format"
    assert param_for("something unrelated went wrong") == ""


def test_param_travels_in_the_metadata():
    error = BatonError(ErrorCode.INVALID_REQUEST, "bad", param="top_p")
    assert (PARAM_METADATA_KEY, "top_p") in error.metadata()
    assert error.with_origin(error.origin).param == "top_p"

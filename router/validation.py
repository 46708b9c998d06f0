"""One validation for both front doors: the gRPC `Generate` gets the limits HTTP's request
models (router/gateway/protocol.py) and `resolve_max_tokens` (router/gateway/convert.py) apply.

`checked_params(params, prompt_len, max_model_len)` returns a copy of a wire `SamplingParams`
with its completion budget resolved as HTTP resolves it (unset `max_tokens`: the rest of the
context; a prompt that leaves no room, or a budget past the context, is refused), after the
same range checks: n in [1, 128], temperature in [0, 2], top_p in (0, 1], min_p in [0, 1],
frequency / presence penalties in [-2, 2], a positive repetition penalty, logprobs and
prompt logprobs at most 20, every float finite (no inf, no NaN). A violation is
BatonError(INVALID_REQUEST) whose `param` names the field, as HTTP's 400s do.
"""
from __future__ import annotations

import math

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import BatonError, ErrorCode

MAX_N = 128
"""Most completions per request (HTTP: `n` le=128)."""
MAX_LOGPROBS = 20

_FLOAT_RANGES = (
    # field, low, high, low inclusive, the range in words
    ("temperature", 0.0, 2.0, True, "[0, 2]"),
    ("top_p", 0.0, 1.0, False, "(0, 1]"),
    ("min_p", 0.0, 1.0, True, "[0, 1]"),
    ("frequency_penalty", -2.0, 2.0, True, "[-2, 2]"),
    ("presence_penalty", -2.0, 2.0, True, "[-2, 2]"),
    ("repetition_penalty", 0.0, math.inf, False, "(0, inf)"),
)
_OPTIONAL = {"temperature", "top_p", "repetition_penalty"}
"""Proto `optional` fields: unset means the default, not 0."""


def _invalid(message: str, param: str) -> BatonError:
    return BatonError(ErrorCode.INVALID_REQUEST, message, param=param)


def check_sampling(params: common_pb2.SamplingParams) -> None:
    """Raise INVALID_REQUEST (naming the field) for a value HTTP would refuse."""
    if params.n > MAX_N:
        raise _invalid(f"n must be at most {MAX_N}, got {params.n}", "n")
    for name, low, high, low_inclusive, words in _FLOAT_RANGES:
        if name in _OPTIONAL and not params.HasField(name):
            continue
        value = getattr(params, name)
        if not math.isfinite(value):
            raise _invalid(f"{name} must be a finite number, got {value}", name)
        if not (value >= low if low_inclusive else value > low) or value > high:
            raise _invalid(f"{name} must be in {words}, got {value:g}", name)
    for name in ("logprobs", "prompt_logprobs"):
        if params.HasField(name) and getattr(params, name) > MAX_LOGPROBS:
            raise _invalid(f"{name} must be at most {MAX_LOGPROBS}", name)
    if params.HasField("max_tokens") and params.max_tokens < 1:
        raise _invalid("max_tokens must be at least 1", "max_tokens")


def checked_params(params: common_pb2.SamplingParams, prompt_len: int,
                   max_model_len: int) -> common_pb2.SamplingParams:
    """A copy of `params`, checked, with `max_tokens` resolved against the context as HTTP does."""
    check_sampling(params)
    resolved = common_pb2.SamplingParams()
    resolved.CopyFrom(params)
    if not max_model_len:
        return resolved
    if prompt_len >= max_model_len:
        raise _invalid(f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                       f"resulted in {prompt_len} tokens. Please reduce the length of the prompt.", "prompt")
    if not params.HasField("max_tokens"):
        resolved.max_tokens = max_model_len - prompt_len
    elif prompt_len + params.max_tokens > max_model_len:
        raise _invalid(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{prompt_len + params.max_tokens} tokens ({prompt_len} in your prompt; {params.max_tokens} "
                       f"for the completion).", "max_tokens")
    if resolved.min_tokens > resolved.max_tokens:
        raise _invalid("min_tokens must not exceed max_tokens", "min_tokens")
    return resolved

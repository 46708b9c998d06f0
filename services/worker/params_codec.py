"""Conversion between the engine's `SamplingParams` and the wire `baton.v1.SamplingParams`.

Owns the field-by-field mapping and its conventions:
- proto `optional` fields left unset mean the engine default (temperature, top_p,
  repetition_penalty 1.0; seed, logprobs and prompt_logprobs None); an unset `max_tokens` means None (up to
  the context length), as the proto documents.
- `n = 0` means 1; `top_k` 0 or -1 means off (the engine's canonical -1, sent as 0).
- `keep_special_tokens` is the negation of `skip_special_tokens`.
- the `StructuredOutput` oneof maps json_schema / json_object / regex / ebnf to
  `StructuredOutputParams(json= / json_object= / regex= / grammar=)`.
- floats travel as float32; they are read back as the shortest decimal that has the same
  float32 value (0.7 stays 0.7, not 0.699999988).
- `SamplingParams.extra` is process-local and does not travel.
A value the engine refuses (its `ValueError`) becomes `BatonError(INVALID_REQUEST, message)`
whose `param` names the field (`param_for`), as the HTTP front door's 400s do.
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Optional

from baton.protos.baton.v1 import common_pb2
from baton.protos.errors import BatonError, ErrorCode
from baton.services.engine.sampling_params import SamplingParams, StructuredOutputParams


_FIELDS = tuple(sorted((f.name for f in dataclasses.fields(SamplingParams)), key=len, reverse=True))
_PARAM_ALIASES = (("structured_output", "response_format"), ("structured-output", "response_format"),
                  ("stop strings", "stop"), ("resume", "resume"), ("prompt", "prompt"))


def param_for(message: str) -> str:
    """The request field an engine refusal is about, from its message ("max_tokens must be at
    least 1" -> "max_tokens"; "the prompt has ..." -> "prompt"); "" when it names none."""
    lowered = message.lower()
    for name in _FIELDS:
        if lowered.startswith(name + " ") or lowered.startswith(name + ":"):
            return "response_format" if name == "structured_output" else name
    for phrase, param in _PARAM_ALIASES:
        if phrase in lowered:
            return param
    return ""


def invalid_request(message: str) -> BatonError:
    """INVALID_REQUEST for an engine refusal, naming the field when the message does."""
    return BatonError(ErrorCode.INVALID_REQUEST, message, param=param_for(message))


def _from_f32(value: float) -> float:
    """The shortest decimal whose float32 is the same as `value`'s float32."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


def _structured_from_proto(msg: common_pb2.StructuredOutput) -> Optional[StructuredOutputParams]:
    kind = msg.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object" and not msg.json_object:
        return None  # json_object=false says "no constraint"
    return StructuredOutputParams(
        json=msg.json_schema if kind == "json_schema" else None,
        json_object=kind == "json_object",
        regex=msg.regex if kind == "regex" else None,
        grammar=msg.ebnf if kind == "ebnf" else None,
    )


def _structured_to_proto(params: Optional[StructuredOutputParams]) -> Optional[common_pb2.StructuredOutput]:
    if params is None:
        return None
    if params.json is not None:
        return common_pb2.StructuredOutput(json_schema=params.json)
    if params.json_object:
        return common_pb2.StructuredOutput(json_object=True)
    if params.regex is not None:
        return common_pb2.StructuredOutput(regex=params.regex)
    return common_pb2.StructuredOutput(ebnf=params.grammar or "")


def _optional(msg: common_pb2.SamplingParams, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def sampling_params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """The engine's `SamplingParams` for a wire message; BatonError(INVALID_REQUEST) when a
    value is out of range."""
    temperature, top_p = _optional(msg, "temperature"), _optional(msg, "top_p")
    repetition_penalty = _optional(msg, "repetition_penalty")
    try:
        return SamplingParams(
            n=msg.n or 1,
            max_tokens=_optional(msg, "max_tokens"),
            min_tokens=msg.min_tokens,
            temperature=1.0 if temperature is None else _from_f32(temperature),
            top_k=-1 if msg.top_k == 0 else msg.top_k,
            top_p=1.0 if top_p is None else _from_f32(top_p),
            min_p=_from_f32(msg.min_p),
            repetition_penalty=1.0 if repetition_penalty is None else _from_f32(repetition_penalty),
            frequency_penalty=_from_f32(msg.frequency_penalty),
            presence_penalty=_from_f32(msg.presence_penalty),
            seed=_optional(msg, "seed"),
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            include_stop_str_in_output=msg.include_stop_str_in_output,
            ignore_eos=msg.ignore_eos,
            logprobs=_optional(msg, "logprobs"),
            prompt_logprobs=_optional(msg, "prompt_logprobs"),
            prompt_logprobs_start=msg.prompt_logprobs_start,
            skip_special_tokens=not msg.keep_special_tokens,
            structured_output=_structured_from_proto(msg.structured_output),
            priority=msg.priority,
        )
    except ValueError as e:
        raise invalid_request(str(e)) from e


def sampling_params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """The wire message for the engine's `SamplingParams` (all fields but `extra`);
    BatonError(INVALID_REQUEST) when a value does not fit its wire type (e.g. a negative seed)."""
    try:
        msg = common_pb2.SamplingParams(
            n=params.n,
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            temperature=params.temperature,
            top_k=0 if params.top_k == -1 else params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            seed=params.seed,
            stop=list(params.stop),
            stop_token_ids=list(params.stop_token_ids),
            include_stop_str_in_output=params.include_stop_str_in_output,
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            prompt_logprobs_start=params.prompt_logprobs_start,
            keep_special_tokens=not params.skip_special_tokens,
            structured_output=_structured_to_proto(params.structured_output),
            priority=params.priority,
        )
    except (ValueError, TypeError) as e:
        raise BatonError(ErrorCode.INVALID_REQUEST, f"sampling params do not fit the wire format: {e}") from e
    return msg

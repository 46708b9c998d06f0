"""The stable offline API: `LLM(model=PATH, **engine_options).generate(prompts, params)`.

Prompts are strings (tokenized with the model's tokenizer) or lists of token ids; the
result is one `RequestOutput` per prompt, in prompt order. A prompt whose request is
invalid (say, a bad JSON schema) gets a `RequestOutput` with `error` set and no
completions; the other prompts still run.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Optional, Sequence, Union

from baton.services.engine.config import EngineConfig
from baton.services.engine.engine import Engine
from baton.services.engine.request import CompletionOutput, RequestDelta, RequestOutput
from baton.services.engine.sampling_params import SamplingParams

Prompt = Union[str, Sequence[int]]


class LLM:
    """Offline generation over an in-process `Engine`."""

    def __init__(self, model: str = "", **engine_options: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; known: {sorted(known)}")
        self.engine = Engine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[RequestOutput]:
        """Generate for every prompt; returns one output per prompt, in order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for prompt, params in zip(prompt_list, params_list):
            request_id, token_ids = str(self._next_id), self._tokenize(prompt)
            self._next_id += 1
            order.append(request_id)
            results[request_id] = RequestOutput(
                request_id, token_ids, [CompletionOutput(i, [], "", None) for i in range(params.n)])
            try:
                self.engine.add_request(request_id, token_ids, params)
            except ValueError as error:
                results[request_id] = RequestOutput(request_id, token_ids, [], finished=True, error=str(error))
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                _apply(results[delta.parent_id], delta)
        return [results[r] for r in order]

    def chat(self, messages: Sequence[dict[str, str]],
             sampling_params: Optional[SamplingParams] = None) -> RequestOutput:
        """Generate a reply to one conversation using the model's chat template."""
        token_ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(token_ids, dict) or hasattr(token_ids, "input_ids"):
            token_ids = token_ids["input_ids"]
        return self.generate([list(token_ids)], sampling_params)[0]

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]


def _apply(output: RequestOutput, delta: RequestDelta) -> None:
    completion = output.outputs[delta.index]
    completion.token_ids.extend(delta.new_token_ids)
    completion.text += delta.new_text
    completion.logprobs.extend(delta.new_logprobs)
    completion.finish_reason = delta.finish_reason
    completion.stop_reason = delta.stop_reason
    output.num_cached_tokens = max(output.num_cached_tokens, delta.num_cached_tokens)
    if delta.prompt_logprobs and not output.prompt_logprobs:
        output.prompt_logprobs = delta.prompt_logprobs
    if delta.error:
        output.error = delta.error
    output.finished = all(c.finish_reason is not None for c in output.outputs)


def _as_prompt_list(prompts: Union[Prompt, Sequence[Prompt]]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def _as_params_list(params: Union[SamplingParams, Iterable[SamplingParams], None], count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params

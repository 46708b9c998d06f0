"""What happens to a request when it receives a sampled token.

Owns: appending the token, advancing the grammar, recording logprobs (the prompt's, when asked
for, ride on the first token's delta), incremental
detokenization through the stop-string checker, and deciding whether (and why) the
request is finished: EOS, a stop token id, a stop string, a completed grammar, max_tokens
or the context length. The result is a `RequestDelta` for the caller to stream.
"""
from __future__ import annotations

from typing import Optional

from baton.services.engine.request import Request, RequestDelta
from baton.services.engine.sampling.sampler import SampledToken


class OutputProcessor:
    """Applies sampled tokens to requests and decides their finish reasons."""

    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def banned_tokens(self, request: Request) -> tuple[int, ...]:
        """Tokens that may not be sampled yet (EOS and stop ids before min_tokens)."""
        params = request.params
        if len(request.output_token_ids) >= params.min_tokens:
            return ()
        eos = () if params.ignore_eos else tuple(self.eos_token_ids)
        return eos + params.stop_token_ids

    def on_token(self, request: Request, sampled: SampledToken) -> RequestDelta:
        """Apply one sampled token; returns the delta (with finish_reason once finished)."""
        request.output_token_ids.append(sampled.token_id)
        return self._apply(request, sampled.token_id, len(request.output_token_ids), sampled)

    def on_resolved(self, request: Request, token: int, count: int) -> RequestDelta:
        """Apply a token sampled one step earlier (overlap scheduling): it already sits at
        output_token_ids[count - 1], where a placeholder stood; later placeholders are ignored."""
        return self._apply(request, token, count, None)

    def _apply(self, request: Request, token: int, count: int, sampled: Optional[SampledToken]) -> RequestDelta:
        delta = self._apply_token(request, token, count, sampled)
        if count == 1 and request.params.prompt_logprobs is not None:
            delta.prompt_logprobs = list(request.prompt_logprobs)  # complete: the whole prompt is computed
        return delta

    def _apply_token(self, request: Request, token: int, count: int, sampled: Optional[SampledToken]) -> RequestDelta:
        params = request.params
        if request.grammar is None and request.detokenizer is None and params.logprobs is None:
            # the common case (token ids only): no text, no grammar, no logprobs
            reason, stop_reason = self._finish_reason(request, token, count)
            if reason is not None:
                request.finish_reason, request.stop_reason = reason, stop_reason
            return RequestDelta(request.request_id, request.parent_id, request.index, [token], "", reason,
                                stop_reason, [], len(request.prompt_token_ids), request.num_cached_tokens)
        if request.grammar is not None:
            request.grammar.accept(token)
        new_logprobs = []
        if params.logprobs is not None and sampled is not None:
            entry = {"token_id": token, "logprob": sampled.logprob, "top_logprobs": sampled.top_logprobs or []}
            request.logprobs.append(entry)
            new_logprobs.append(entry)
        text = ""
        if request.detokenizer is not None:
            text, stopped = request.stop_checker.feed(request.detokenizer.add(token))
            if stopped:
                self._finish(request, "stop", request.stop_checker.matched_stop)
        if request.finish_reason is None:
            reason, stop_reason = self._finish_reason(request, token, count)
            if reason is not None:
                self._finish(request, reason, stop_reason)
                text += self._flush(request)
        if text:
            request.text_parts.append(text)
        return RequestDelta(
            request_id=request.request_id, parent_id=request.parent_id, index=request.index,
            new_token_ids=[token], new_text=text, finish_reason=request.finish_reason,
            stop_reason=request.stop_reason, new_logprobs=new_logprobs,
            num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=request.num_cached_tokens,
        )

    def _finish_reason(self, request: Request, token: int, count: int) -> tuple[Optional[str], object]:
        """Why the request ends with its count-th output token `token` (None: it goes on)."""
        params = request.params
        enough = count >= params.min_tokens
        if enough and not params.ignore_eos and token in self.eos_token_ids:
            return "stop", None
        if enough and token in params.stop_token_ids:
            return "stop", token
        if request.grammar is not None and request.grammar.is_terminated():
            return "stop", None
        if params.max_tokens is not None and count >= params.max_tokens:
            return "length", None
        if len(request.prompt_token_ids) + count >= self.max_model_len:
            return "length", None
        return None, None

    @staticmethod
    def _finish(request: Request, reason: str, stop_reason: object) -> None:
        request.finish_reason = reason
        request.stop_reason = stop_reason

    @staticmethod
    def _flush(request: Request) -> str:
        """Text held back by the detokenizer or stop checker, released at a non-stop-string finish."""
        if request.detokenizer is None:
            return ""
        text, stopped = request.stop_checker.feed(request.detokenizer.finish())
        if stopped:
            request.stop_reason = request.stop_checker.matched_stop
            return text
        return text + request.stop_checker.flush()

"""Chat templates come from the operator, never from a request: `guard_request_templates`.

A Jinja chat template is code: one supplied in a request (`chat_template_kwargs:
{"chat_template": "..."}`, which the tokenizer's `apply_chat_template` would render instead of
the model's) can loop for minutes and slow every user down (vLLM's GHSA-6fvq-23cw-5628). By
default the router's tokenizer is wrapped so that every render (chat completions, /tokenize,
/v1/select: they all go through `apply_chat_template`) refuses a request-supplied template with
a 400 naming `chat_template_kwargs.chat_template`; other template variables
(`enable_thinking`, ...) still pass. `--trust-request-chat-template` leaves the tokenizer as
it is. The operator's own template (`--chat-template FILE`) is the tokenizer's and unaffected.
"""
from __future__ import annotations

from typing import Any

from baton.router.gateway.errors import ApiError

REFUSED = ("request-supplied chat templates are refused: this router renders only its own template "
           "(start it with --trust-request-chat-template to allow them)")


class TemplateGuardedTokenizer:
    """A tokenizer whose `apply_chat_template` refuses a `chat_template` argument; everything
    else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any) -> None:
        object.__setattr__(self, "_tokenizer", tokenizer)

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("chat_template") is not None:
            raise ApiError(400, REFUSED, param="chat_template_kwargs.chat_template")
        return self._tokenizer.apply_chat_template(conversation, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tokenizer, name, value)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)


def guard_request_templates(tokenizer: Any, trust_request_chat_template: bool) -> Any:
    """The tokenizer the gateway renders chats with: guarded unless requests' templates are trusted."""
    if tokenizer is None or trust_request_chat_template:
        return tokenizer
    return TemplateGuardedTokenizer(tokenizer)

"""Request-supplied chat templates are refused by default (`--trust-request-chat-template`
allows them), on every route that renders a chat: the real gateway app and the real SmolLM2
tokenizer, behind the scripted core of conftest.py. Other template variables still pass."""
from __future__ import annotations

from baton.router.config import RouterConfig
from baton.router.gateway.template_guard import TemplateGuardedTokenizer, guard_request_templates
from tests.unit.router.gateway.conftest import FakeCore
from tests.unit.router.gateway.test_app import call

SLOW = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
CUSTOM = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
MESSAGES = [{"role": "user", "content": "Hi"}]


def core_for(tokenizer, trust: bool) -> FakeCore:
    return FakeCore(guard_request_templates(tokenizer, RouterConfig(trust_request_chat_template=trust)
                                            .trust_request_chat_template))


def test_request_templates_are_refused_by_default(tokenizer) -> None:
    core = core_for(tokenizer, trust=False)
    assert isinstance(core.tokenizer, TemplateGuardedTokenizer)
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}),
                       ("/tokenize", {"messages": MESSAGES}),
                       ("/v1/select", {"messages": MESSAGES, "choices": ["a", "b"]})):
        response = call(core, "POST", path, json={**body, "chat_template_kwargs": {"chat_template": SLOW}})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "chat_template_kwargs.chat_template" and "--trust-request-chat-template" in \
            error["message"]
    assert core.requests == []  # nothing was rendered or sent
    plain = call(core, "POST", "/tokenize", json={"messages": MESSAGES})
    with_variable = call(core, "POST", "/tokenize", json={"messages": MESSAGES,
                                                         "chat_template_kwargs": {"enable_thinking": False}})
    assert plain.status_code == with_variable.status_code == 200
    assert plain.json()["tokens"] == with_variable.json()["tokens"]
    assert call(core, "POST", "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4}).status_code == 200


def test_trusted_router_renders_the_request_template(tokenizer) -> None:
    core = core_for(tokenizer, trust=True)
    assert core.tokenizer is tokenizer
    response = call(core, "POST", "/tokenize", json={"messages": MESSAGES,
                                                    "chat_template_kwargs": {"chat_template": CUSTOM}})
    assert response.status_code == 200
    assert tokenizer.decode(response.json()["tokens"]) == "<<Hi>>"

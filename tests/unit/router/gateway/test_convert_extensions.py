"""Echo, `max_tokens: 0`, chat continuation and the select prompts (with the real SmolLM2
tokenizer): what the gateway sends the core for the frontend language's calls."""
from __future__ import annotations

import pytest

from baton.router.gateway.convert import prepare_chat, prepare_completion, render_chat
from baton.router.gateway.select import choice_prompts
from tests.unit.router.gateway.test_convert import MAX_LEN, bad_request, chat, completion

CHAT = [{"role": "user", "content": "Is the sky blue?"}]


def test_echo_with_logprobs_asks_for_every_prompt_logprob(tokenizer) -> None:
    prepared = prepare_completion(completion(echo=True, logprobs=2, max_tokens=3), tokenizer, MAX_LEN)
    assert prepared.echo.text == "Once upon" and prepared.echo.token_ids == tokenizer.encode("Once upon")
    assert not prepared.echo.only
    assert prepared.params.prompt_logprobs == 2 and prepared.params.prompt_logprobs_start == 0
    assert prepared.params.logprobs == 2 and prepared.params.max_tokens == 3
    plain = prepare_completion(completion(echo=True, max_tokens=3), tokenizer, MAX_LEN)
    assert plain.echo is not None and not plain.params.HasField("prompt_logprobs")
    ids = prepare_completion(completion(echo=True, prompt=[[7, 8, 9]], max_tokens=1), tokenizer, MAX_LEN)
    assert ids.echo.text == tokenizer.decode([7, 8, 9])


def test_max_tokens_zero_is_echo_only(tokenizer) -> None:
    prepared = prepare_completion(completion(echo=True, logprobs=0, max_tokens=0), tokenizer, MAX_LEN)
    assert prepared.echo.only and prepared.params.max_tokens == 1
    error = bad_request(lambda: prepare_completion(completion(max_tokens=0), tokenizer, MAX_LEN))
    assert error.param == "max_tokens" and "only with echo" in error.message
    error = bad_request(lambda: prepare_completion(completion(echo=True, max_tokens=0, min_tokens=1), tokenizer,
                                                   MAX_LEN))
    assert error.param == "min_tokens"
    assert bad_request(lambda: chat(max_tokens=0)).param == "max_tokens"  # chat never allows 0


def test_continue_final_message_leaves_the_reply_open(tokenizer) -> None:
    messages = CHAT + [{"role": "assistant", "content": "Yes, because"}]
    ids = prepare_chat(chat(messages=messages, continue_final_message=True), tokenizer, MAX_LEN).prompt_token_ids
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\nYes, because")
    fresh = prepare_chat(chat(messages=CHAT), tokenizer, MAX_LEN).prompt_token_ids
    assert ids[:len(fresh)] == fresh  # the open reply extends the generation prompt
    empty = CHAT + [{"role": "assistant", "content": ""}]
    assert render_chat(empty, tokenizer, continue_final_message=True) == fresh
    closed = render_chat(CHAT, tokenizer, add_generation_prompt=False)
    assert fresh[:len(closed)] == closed and len(closed) < len(fresh)


def test_bad_continuations_are_400s(tokenizer) -> None:
    error = bad_request(lambda: prepare_chat(chat(messages=CHAT, continue_final_message=True), tokenizer, MAX_LEN))
    assert error.param == "continue_final_message" and "assistant" in error.message
    both = CHAT + [{"role": "assistant", "content": "x"}]
    error = bad_request(lambda: prepare_chat(chat(messages=both, continue_final_message=True,
                                                  add_generation_prompt=True), tokenizer, MAX_LEN))
    assert "at most one" in error.message


def test_select_prompts_share_the_prefix_tokens(tokenizer) -> None:
    prompt = "The weather today is"
    full, shared = choice_prompts(tokenizer, [" sunny", " rainy and cold"], prompt=prompt)
    prefix = tokenizer.encode(prompt)
    assert shared == len(prefix) and all(ids[:shared] == prefix for ids in full)
    assert full[1] == tokenizer.encode(prompt + " rainy and cold")
    merged, shared = choice_prompts(tokenizer, ["s", "ful"], prompt="The cat")  # "cats" is one token
    assert merged[0] == tokenizer.encode("The cats") and shared < len(tokenizer.encode("The cat"))


def test_select_prompts_in_a_chat_continue_the_reply(tokenizer) -> None:
    full, shared = choice_prompts(tokenizer, ["Yes", "No"], messages=CHAT)
    fresh = render_chat(CHAT, tokenizer)
    assert shared == len(fresh) and tokenizer.decode(full[1]).endswith("assistant\nNo")
    opened = CHAT + [{"role": "assistant", "content": "Answer:"}]
    full, shared = choice_prompts(tokenizer, [" yes", " no"], messages=opened, continue_final_message=True)
    assert tokenizer.decode(full[0]).endswith("assistant\nAnswer: yes")
    full, _ = choice_prompts(tokenizer, ["Yes"], messages=opened)  # a new reply after a finished one
    assert tokenizer.decode(full[0]).endswith("assistant\nAnswer:<|im_end|>\n<|im_start|>assistant\nYes")
    error = bad_request(lambda: choice_prompts(tokenizer, ["a"], messages=CHAT, continue_final_message=True))
    assert error.param == "continue_final_message"


@pytest.mark.parametrize("kwargs, param", [
    (dict(choices=[]), "choices"), (dict(choices=["a", ""]), "choices.1"),
    (dict(choices=["a"], prompt=""), "prompt"), (dict(choices=["a"], prompt="x", messages=CHAT), "prompt"),
])
def test_bad_select_requests_are_400s(tokenizer, kwargs, param) -> None:
    if "messages" not in kwargs:
        kwargs.setdefault("prompt", "Pick one:")
    choices = kwargs.pop("choices")
    assert bad_request(lambda: choice_prompts(tokenizer, choices, **kwargs)).param == param

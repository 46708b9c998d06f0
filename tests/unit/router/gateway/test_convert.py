"""Request bodies -> prompt token ids + wire SamplingParams (with the real SmolLM2 tokenizer)."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from baton.router.gateway.convert import (_as_id_list, chat_messages, check_model, prepare_chat,
                                    prepare_completion, resolve_max_tokens, sampling_params)
from baton.router.gateway.errors import ApiError, as_api_error
from baton.router.gateway.protocol import ChatCompletionRequest, CompletionRequest

MAX_LEN = 2048
HI = [{"role": "user", "content": "Hi there"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HI, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "Once upon", **fields})


def bad_request(make, **fields) -> ApiError:
    with pytest.raises((ValidationError, ApiError)) as info:
        make(**fields)
    error = as_api_error(info.value)
    assert error.status == 400
    return error


# ------------------------------------------------------------------ parsing and validation


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"), ({"n": 0}, "n"),
    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"), ({"max_tokens": 0}, "max_tokens"),
    ({"response_format": {"type": "xml"}}, "response_format.type"), ({"stop": ["ok", ""]}, "stop"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
])
def test_bad_chat_fields_are_400s(fields, param) -> None:
    error = bad_request(chat, **fields)
    assert error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_lenient_parsing() -> None:
    body = chat(unknown_field=1, n=None, temperature=None, stream=None, stop="END",
                messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                           "name": "ann"}])
    assert body.n is None and body.stop_list == ["END"] and not body.include_usage
    assert chat_messages(body) == [{"role": "user", "content": "a\nb", "name": "ann"}]
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert completion(prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert completion(prompt=["a"]).prompt == ["a"]


def test_check_model() -> None:
    check_model("smol", "smol")
    check_model(None, "smol")
    with pytest.raises(ApiError) as info:
        check_model("gpt-4", "smol")
    assert info.value.status == 404 and info.value.code == "model_not_found"


# ------------------------------------------------------------------ prompts


def test_chat_template_tokenization(tokenizer) -> None:
    prepared = prepare_chat(chat(), tokenizer, MAX_LEN)
    expected = tokenizer.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    assert expected.endswith("<|im_start|>assistant\n")
    assert prepared.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}])
    assert prepare_chat(parts, tokenizer, MAX_LEN).prompt_token_ids == prepared.prompt_token_ids


def test_chat_template_result_shapes() -> None:
    assert _as_id_list([1, 2]) == [1, 2]
    assert _as_id_list({"input_ids": [3, 4], "attention_mask": [1, 1]}) == [3, 4]
    assert _as_id_list({"input_ids": [[5, 6]]}) == [5, 6]


def test_unsupported_content_and_tools(tokenizer) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    # image parts reach the chat template (media.py checks the images; a text model's template refuses them)
    assert bad_request(lambda: prepare_chat(chat(messages=image), tokenizer, MAX_LEN)).param.startswith("messages")
    tools = [{"type": "function", "function": {"name": "f"}}]
    no_parser = bad_request(lambda: prepare_chat(chat(tools=tools), tokenizer, MAX_LEN))  # auto needs a parser
    assert no_parser.param == "tool_choice" and "--tool-call-parser" in no_parser.message
    web = [{"type": "web_search"}]
    assert bad_request(lambda: prepare_chat(chat(tools=web), tokenizer, MAX_LEN)).param == "tools.0"


def test_completion_prompts(tokenizer) -> None:
    assert prepare_completion(completion(), tokenizer, MAX_LEN).prompt_token_ids == tokenizer.encode("Once upon")
    assert prepare_completion(completion(prompt=[[7, 8]]), tokenizer, MAX_LEN).prompt_token_ids == [7, 8]
    assert bad_request(lambda: prepare_completion(completion(prompt=["a", "b"]), tokenizer, MAX_LEN)).param == "prompt"
    assert "out of range" in bad_request(
        lambda: prepare_completion(completion(prompt=[10**7]), tokenizer, MAX_LEN)).message
    assert bad_request(lambda: prepare_completion(completion(prompt=""), tokenizer, MAX_LEN)).param == "prompt"
    for field, value in [("suffix", "x"), ("best_of", 3), ("logit_bias", {"1": 5})]:
        error = bad_request(lambda: prepare_completion(completion(**{field: value}), tokenizer, MAX_LEN))
        assert error.param == field


# ------------------------------------------------------------------ limits


def test_max_tokens_defaults_to_the_rest_of_the_context(tokenizer) -> None:
    prepared = prepare_chat(chat(), tokenizer, MAX_LEN)
    assert prepared.params.HasField("max_tokens")
    assert prepared.params.max_tokens == MAX_LEN - len(prepared.prompt_token_ids)
    assert prepare_chat(chat(max_tokens=7), tokenizer, MAX_LEN).params.max_tokens == 7
    assert prepare_chat(chat(max_tokens=7, max_completion_tokens=9), tokenizer, MAX_LEN).params.max_tokens == 9
    assert prepare_completion(completion(max_tokens=5), tokenizer, MAX_LEN).params.max_tokens == 5


def test_context_length_errors() -> None:
    assert resolve_max_tokens(None, 100, 128, chat=True) == 28
    assert resolve_max_tokens(28, 100, 128, chat=True) == 28
    error = bad_request(lambda: resolve_max_tokens(29, 100, 128, chat=True))
    assert error.code == "context_length_exceeded" and error.param == "messages"
    assert error.message == ("This model's maximum context length is 128 tokens. However, you requested 129 "
                             "tokens (100 in the messages, 29 in the completion). Please reduce the length of "
                             "the messages or completion.")
    error = bad_request(lambda: resolve_max_tokens(50, 100, 128, chat=False))
    assert "(100 in your prompt; 50 for the completion)" in error.message and error.param == "prompt"
    error = bad_request(lambda: resolve_max_tokens(None, 128, 128, chat=False))
    assert error.message.startswith("This model's maximum context length is 128 tokens. However, your prompt "
                                    "resulted in 128 tokens.")
    assert bad_request(lambda: resolve_max_tokens(None, 0, 128, chat=True)).param == "messages"


# ------------------------------------------------------------------ sampling params


def test_every_sampling_field_maps() -> None:
    body = chat(n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
                frequency_penalty=0.5, presence_penalty=-0.5, seed=1234, stop=["\n\n", "END"],
                stop_token_ids=[2, 7], include_stop_str_in_output=True, ignore_eos=True, min_tokens=3,
                logprobs=True, top_logprobs=4, skip_special_tokens=False, priority=-2, regex="[a-z]+")
    params = sampling_params(body, 100)
    assert params.n == 3 and params.max_tokens == 100 and params.min_tokens == 3
    assert params.temperature == pytest.approx(0.7) and params.top_p == pytest.approx(0.9)
    assert params.top_k == 40 and params.min_p == pytest.approx(0.05)
    assert params.repetition_penalty == pytest.approx(1.1)
    assert params.frequency_penalty == pytest.approx(0.5) and params.presence_penalty == pytest.approx(-0.5)
    assert params.seed == 1234 and list(params.stop) == ["\n\n", "END"] and list(params.stop_token_ids) == [2, 7]
    assert params.include_stop_str_in_output and params.ignore_eos and params.keep_special_tokens
    assert params.HasField("logprobs") and params.logprobs == 4 and params.priority == -2
    assert params.structured_output.WhichOneof("kind") == "regex" and params.structured_output.regex == "[a-z]+"


def test_defaults_leave_optional_fields_unset() -> None:
    params = sampling_params(chat(), 10)
    for name in ("temperature", "top_p", "repetition_penalty", "seed", "logprobs"):
        assert not params.HasField(name), name
    assert params.n == 1 and params.top_k == 0 and not params.keep_special_tokens
    assert params.structured_output.WhichOneof("kind") is None
    assert sampling_params(chat(top_k=-1), 10).top_k == 0
    assert sampling_params(chat(temperature=0), 10).HasField("temperature")
    assert sampling_params(chat(seed=-1), 10).seed == 2**64 - 1


def test_logprobs_mapping() -> None:
    assert sampling_params(chat(logprobs=True), 10).logprobs == 0
    assert not sampling_params(chat(logprobs=False), 10).HasField("logprobs")
    assert sampling_params(completion(logprobs=0), 10).HasField("logprobs")
    assert sampling_params(completion(logprobs=5), 10).logprobs == 5
    assert not sampling_params(completion(), 10).HasField("logprobs")


def test_structured_output_mapping() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    so = sampling_params(chat(response_format=fmt), 10).structured_output
    assert so.WhichOneof("kind") == "json_schema" and json.loads(so.json_schema) == schema
    so = sampling_params(chat(response_format={"type": "json_object"}), 10).structured_output
    assert so.WhichOneof("kind") == "json_object" and so.json_object
    assert sampling_params(chat(response_format={"type": "text"}), 10).structured_output.WhichOneof("kind") is None
    so = sampling_params(completion(ebnf='root ::= "yes" | "no"'), 10).structured_output
    assert so.ebnf == 'root ::= "yes" | "no"'
    assert bad_request(lambda: sampling_params(chat(response_format={"type": "json_object"}, regex="a"), 10)).param \
        == "regex"
    assert bad_request(lambda: sampling_params(chat(response_format={"type": "json_schema"}), 10)).param \
        == "response_format.json_schema"


def test_min_tokens_must_fit_max_tokens() -> None:
    assert bad_request(lambda: sampling_params(chat(min_tokens=11), 10)).param == "min_tokens"

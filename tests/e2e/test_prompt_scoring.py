"""Prompt scoring through a real `baton up` (embedded SmolLM2): `echo` + `logprobs` on
/v1/completions with the official openai client, and `POST /v1/select`, both equal to a
direct computation with transformers on the same weights; the prefix cache is reused only
before the positions that need logits, and scoring requests go decode-only."""
import httpx
import openai
import pytest
import torch

from tests.e2e.test_baton_up_openai import client, model_name  # noqa: F401 (the shared client fixtures)

PREFIX = "Question: which planet is known as the red planet?\nAnswer:"


@pytest.fixture(scope="module")
def hf(default_model_path):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    return tokenizer, model


def token_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from transformers."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_echo_logprobs_equal_transformers(client, model_name, hf):
    tokenizer, model = hf
    prompt = PREFIX + " Mars, the fourth planet from the sun."
    reply = client.completions.create(model=model_name, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    choice = reply.choices[0]
    ids = tokenizer.encode(prompt)
    assert choice.text == prompt and reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(token_logprobs(model, ids), abs=1e-3)
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs[1:])
    generated = client.completions.create(model=model_name, prompt=prompt, echo=True, logprobs=0, max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
    lp = generated.choices[0].logprobs
    assert generated.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-4)


def test_a_cached_prompt_is_still_scored_in_full(client, model_name, hf, baton_up):
    tokenizer, model = hf
    prompt = PREFIX + " It is Mars. " * 6
    for _ in range(2):  # cache it on the decode worker (the second one hits)
        warm = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, temperature=0)
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    decode_only = metric(baton_up, "baton_router_paths_total", path="decode_only")
    disaggregated = metric(baton_up, "baton_router_paths_total", path="disaggregated")
    scored = client.completions.create(model=model_name, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    assert scored.usage.prompt_tokens_details.cached_tokens == 0  # every position's logits were computed
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        token_logprobs(model, tokenizer.encode(prompt)), abs=1e-3)
    assert metric(baton_up, "baton_router_paths_total", path="decode_only") == decode_only + 1
    assert metric(baton_up, "baton_router_paths_total", path="disaggregated") == disaggregated


def test_select_scores_equal_transformers(baton_up, hf):
    tokenizer, model = hf
    choices = [" Mars", " Venus", " Jupiter, the largest planet"]
    reply = httpx.post(baton_up + "/v1/select", json={"prompt": PREFIX, "choices": choices}, timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    prefix = tokenizer.encode(PREFIX)
    assert body["prefix_tokens"] == len(prefix)
    expected = []
    for choice, got in zip(choices, body["choices"]):
        ids = tokenizer.encode(PREFIX + choice)
        logprobs = token_logprobs(model, ids)[len(prefix) - 1:]
        assert got["token_ids"] == ids[len(prefix):]
        assert got["token_logprobs"] == pytest.approx(logprobs, abs=1e-3)
        expected.append(sum(logprobs) / len(logprobs))
        assert got["score"] == pytest.approx(expected[-1], abs=1e-3)
    assert body["selected"] == max(range(len(choices)), key=expected.__getitem__)
    # the first choice cached the prefix; the others reused it (whole pages before the choice)
    assert all(c["cached_tokens"] >= (len(prefix) - 1) // 16 * 16 for c in body["choices"][1:])


def test_select_in_a_chat_continues_the_assistant_reply(baton_up, hf):
    tokenizer, model = hf
    messages = [{"role": "user", "content": "Is the sky blue on a clear day? Answer yes or no."}]
    reply = httpx.post(baton_up + "/v1/select", json={"messages": messages, "choices": ["Yes", "No"]}, timeout=120)
    body = reply.json()
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for choice, got in zip(["Yes", "No"], body["choices"]):
        ids = tokenizer.encode(rendered + choice)
        shared = body["prefix_tokens"]
        assert ids[:shared] == tokenizer.encode(rendered)[:shared]
        assert got["score"] == pytest.approx(sum(token_logprobs(model, ids)[shared - 1:]) / (len(ids) - shared),
                                             abs=1e-3)


def test_bad_scoring_requests_are_400s(client, model_name, baton_up):
    with pytest.raises(openai.BadRequestError, match="only with echo"):
        client.completions.create(model=model_name, prompt="hi", max_tokens=0)
    for body, needle in [({"prompt": "x", "choices": []}, "choices"), ({"choices": ["a"]}, "exactly one"),
                         ({"prompt": "x", "choices": ["a", ""]}, "non-empty")]:
        reply = httpx.post(baton_up + "/v1/select", json=body, timeout=30)
        assert reply.status_code == 400 and needle in reply.json()["error"]["message"], reply.text


def test_tokenize_and_detokenize_render_the_chat_template(baton_up, hf):
    tokenizer, _ = hf
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    reply = httpx.post(baton_up + "/tokenize", json={"messages": messages, "continue_final_message": True},
                       timeout=30).json()
    expected = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert reply["tokens"] == tokenizer.encode(expected) and reply["count"] == len(reply["tokens"])
    text = httpx.post(baton_up + "/detokenize", json={"tokens": reply["tokens"]}, timeout=30).json()["prompt"]
    assert text == expected

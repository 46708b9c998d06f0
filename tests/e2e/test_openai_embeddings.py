"""`/v1/embeddings` with the official client, on the tool router in front of the session's
`baton up` workers: the embedded SmolLM2's last-token final hidden state, L2-normalized, equal
to transformers' within float tolerance; text and token-id inputs, batches, float and base64
encodings agree; `dimensions` is refused by name."""
import openai
import pytest
import torch


@pytest.fixture(scope="module")
def client(tool_router):
    return openai.OpenAI(base_url=tool_router + "/v1", api_key="unused", max_retries=0, timeout=120)


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Embeddings from a decoder model", "hi"]


def test_embeddings_equal_transformers_last_token_pooling(client, default_model_path):
    import transformers
    reply = client.embeddings.create(model="SmolLM2-135M-Instruct", input=TEXTS, encoding_format="float")
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.object == "list"
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path)
    hf = transformers.AutoModel.from_pretrained(default_model_path, dtype=torch.float32).eval()
    ids = [tokenizer.encode(t) for t in TEXTS]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(len(i) for i in ids)
    for data, prompt in zip(reply.data, ids):
        with torch.no_grad():
            hidden = hf(torch.tensor([prompt])).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(hidden, dim=0)
        got = torch.tensor(data.embedding)
        assert got.shape == want.shape == (hf.config.hidden_size,)
        assert abs(got.norm().item() - 1.0) < 1e-4
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    # token ids embed as their text does; the client's default (base64) decodes to the same floats
    by_ids = client.embeddings.create(model="SmolLM2-135M-Instruct", input=ids, encoding_format="float")
    packed = client.embeddings.create(model="SmolLM2-135M-Instruct", input=TEXTS)  # base64 on the wire
    one = client.embeddings.create(model="SmolLM2-135M-Instruct", input=TEXTS[1], encoding_format="float")
    for a, b, c in zip(reply.data, by_ids.data, packed.data):
        torch.testing.assert_close(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(a.embedding), torch.tensor(c.embedding), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), torch.tensor(reply.data[1].embedding),
                               atol=1e-6, rtol=0)


def test_embedding_refusals(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="SmolLM2-135M-Instruct", input="x", dimensions=64)
    assert info.value.body["param"] == "dimensions" and "dimensions is not supported" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="SmolLM2-135M-Instruct", input=[[10**7]])
    assert "out of range" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other-model", input="x")

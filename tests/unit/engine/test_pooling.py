"""Embeddings from the engine (`Engine.embed`, services/engine/pooling.py) equal transformers'
final hidden states of the same tiny model, pooled the same way (last token, mean), L2-normalized
or not; a batch equals its prompts one by one; every scratch block goes back to the pool; bad
inputs are refused before anything runs."""
import pytest
import torch

from baton.services.engine.config import EngineConfig
from baton.services.engine.engine import Engine
from baton.services.engine.sampling_params import SamplingParams
from tests.helpers.tiny_models import load_hf, make_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("pooling"))


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(EngineConfig(model=str(folder), page_size=4, kv_cache_tokens=256, num_threads=1))


@pytest.fixture(scope="module")
def hf(folder):
    return load_hf(folder)


def hf_hidden(hf, prompt):
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), output_hidden_states=True)
    return out.hidden_states[-1][0]  # after the final norm, as transformers returns it


PROMPTS = [[5, 17, 33, 9, 101, 7], [200, 3, 45], list(range(10, 40))]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_equal_transformers_pooled_hidden_states(engine, hf, pooling):
    got = engine.embed(PROMPTS, pooling=pooling, normalize=False)
    for prompt, vector in zip(PROMPTS, got):
        hidden = hf_hidden(hf, prompt)
        want = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
        torch.testing.assert_close(torch.tensor(vector), want, atol=1e-4, rtol=1e-4)
    normalized = engine.embed(PROMPTS, pooling=pooling)
    for raw, unit in zip(got, normalized):
        raw = torch.tensor(raw)
        torch.testing.assert_close(torch.tensor(unit), raw / raw.norm(), atol=1e-5, rtol=1e-5)
        assert abs(torch.tensor(unit).norm().item() - 1.0) < 1e-5


def test_batch_equals_one_by_one_and_blocks_return(engine):
    engine.check_idle_integrity()
    free = engine.pool.num_free
    batch = engine.embed(PROMPTS)
    assert batch == [engine.embed([p])[0] for p in PROMPTS]
    assert engine.pool.num_free == free
    engine.check_idle_integrity()


def test_embedding_between_generation_steps_leaves_generation_exact(engine):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def generate(interleave):
        engine.add_request("g", [4, 8, 15, 16, 23, 42], params)
        tokens = []
        while engine.has_unfinished():
            for delta in engine.step():
                tokens += delta.new_token_ids
            if interleave:
                engine.embed([[9, 9, 9, 9, 9]])
        return tokens

    assert generate(True) == generate(False)


@pytest.mark.parametrize("prompts, pooling, message", [
    ([], "last", "at least one"),
    ([[]], "last", "input 0 is empty"),
    ([[1, 2], [10**6]], "last", "input 1: token id"),
    ([[1, 2]], "cls", "pooling must be one of"),
    ([[1] * 2000], "last", "more than the context"),
])
def test_bad_inputs_are_refused(engine, prompts, pooling, message):
    with pytest.raises(ValueError, match=message):
        engine.embed(prompts, pooling=pooling)


def test_a_long_input_in_chunks_equals_one_pass(folder, engine):
    chunked = Engine(EngineConfig(model=str(folder), page_size=4, kv_cache_tokens=256, num_threads=1,
                                  chunked_prefill_size=7, max_num_batched_tokens=64))
    prompt = list(range(5, 45))
    for pooling in ("last", "mean"):
        torch.testing.assert_close(torch.tensor(chunked.embed([prompt], pooling=pooling)[0]),
                                   torch.tensor(engine.embed([prompt], pooling=pooling)[0]), atol=1e-5, rtol=1e-5)

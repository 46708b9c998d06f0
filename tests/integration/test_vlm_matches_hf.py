"""Vision-language models in the engine: greedy outputs equal transformers', token for token.

Tiny random-weight LLaVA-1.5 (CLIP tower, MLP projector, Llama decoder) and Qwen2.5-VL
(window-attention ViT with 2-D rope, patch merger, multimodal rope) folders; images are
preprocessed by the folders' own Hugging Face image processors. One image, two images, an
image at the very start, text before and after, under chunked prefill that cuts image
spans across steps. Prefix caching keys image spans by content hash: the same image
shares blocks past it, a different one behind the same placeholders does not.
"""
from __future__ import annotations

import pytest

from baton.services.engine import SamplingParams
from baton.services.engine.config import EngineConfig
from baton.services.engine.engine import Engine
from baton.services.engine.multimodal.image_encoder import ImageEncoder, decode_image
from tests.helpers.tiny_models import IMAGE_TOKEN, hf_vlm_greedy, load_hf_vlm, make_tiny_vlm, tiny_image

FAMILIES = ["llava", "qwen2_5_vl"]
MAX_NEW = 10
IMAGES = [tiny_image(1, 56, 84), tiny_image(2, 84, 56), tiny_image(3, 112, 56)]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """Factory: vlm(family) -> (folder, transformers model, ImageEncoder), built once."""
    built = {}

    def get(family: str):
        if family not in built:
            folder = make_tiny_vlm(family, tmp_path_factory.mktemp(family))
            built[family] = folder, load_hf_vlm(folder), ImageEncoder(folder)
        return built[family]
    return get


def make_engine(folder, **options) -> Engine:
    return Engine(EngineConfig(model=str(folder), num_threads=2, **({"page_size": 4, "kv_cache_tokens": 2048}
                                                                     | options)))


def run(engine: Engine, encoder: ImageEncoder, cases: dict[str, tuple[list[int], list[bytes]]]) -> dict:
    """Submit every case at once (one batch), step to the end; request id -> (tokens, cached tokens)."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    for rid, (prompt, images) in cases.items():
        prepared = [encoder.prepare(b) for b in images]
        expanded, spans = encoder.spans(prompt, prepared, encoder.encode(prepared))
        engine.add_image_request(rid, expanded, params, spans)
    tokens: dict[str, list[int]] = {rid: [] for rid in cases}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id].extend(delta.new_token_ids)
            cached[delta.request_id] = delta.num_cached_tokens
    engine.check_idle_integrity()
    return {rid: (tokens[rid], cached.get(rid, 0)) for rid in cases}


def reference(hf, encoder: ImageEncoder, prompt: list[int], images: list[bytes]) -> list[int]:
    expanded, _ = encoder.spans(prompt, [encoder.prepare(b) for b in images])
    return hf_vlm_greedy(hf, expanded, [decode_image(b) for b in images], MAX_NEW)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_images_equals_transformers(family, vlm):
    folder, hf, encoder = vlm(family)
    img = IMAGE_TOKEN[family]
    cases = {
        "one image, text around": ([5, 6, img, 7, 8, 9], IMAGES[:1]),
        "two images": ([5, img, 9, 10, 11, img, 12], IMAGES[:2]),
        "image first": ([img, 3, 4], IMAGES[2:]),
        "text only": ([5, 6, 7, 8, 9, 10, 11], []),
    }
    outputs = run(make_engine(folder, chunked_prefill_size=8, max_num_batched_tokens=24), encoder, cases)
    for rid, (prompt, images) in cases.items():
        assert outputs[rid][0] == reference(hf, encoder, prompt, images), rid


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_keys_images_by_content(family, vlm):
    folder, hf, encoder = vlm(family)
    img = IMAGE_TOKEN[family]
    prompt = [5, 6, 7, 8, img, 9, 10, 11, 12, 13]  # the image starts on a page boundary (page 4)
    engine = make_engine(folder)
    first = run(engine, encoder, {"a": (prompt, IMAGES[:1])})["a"]
    other = run(engine, encoder, {"b": (prompt, IMAGES[1:2])})["b"]
    same = run(engine, encoder, {"c": (prompt, IMAGES[:1])})["c"]
    assert other[1] == 4, "a different image behind the same placeholders shared blocks past the text"
    assert same[1] > 4 + encoder.prepare(IMAGES[0]).num_tokens - 4, "the same image did not hit the cache"
    assert first[0] == same[0] == reference(hf, encoder, prompt, IMAGES[:1])
    assert other[0] == reference(hf, encoder, prompt, IMAGES[1:2])
    assert other[0] != first[0], "different images gave the same output: the image does not reach the model"


def test_bad_image_requests_are_refused_before_holding_anything(vlm):
    folder, _, encoder = vlm("llava")
    engine = make_engine(folder)
    img = IMAGE_TOKEN["llava"]
    prepared = encoder.prepare(IMAGES[0])
    expanded, spans = encoder.spans([5, img, 6], [prepared], encoder.encode([prepared]))
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="placeholder"):
        engine.add_image_request("short", expanded[:-3] + [7, 7, 7], params, spans)
    spans[0].embeddings = spans[0].embeddings[:, :8]
    with pytest.raises(ValueError, match="shape"):
        engine.add_image_request("narrow", expanded, params, spans)
    with pytest.raises(ValueError, match="images"):
        encoder.spans([5, img, 6, img], [prepared])
    with pytest.raises(ValueError, match="decoded"):
        encoder.prepare(b"not an image")
    assert not engine.has_unfinished() and engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_counts_like_prepare(family, vlm):
    """What a worker needs to expand a prompt (hash, token count, grid) is what the full
    preprocessing gives, without the pixel values for LLaVA; bad bytes are refused the same."""
    _, _, encoder = vlm(family)
    for data in IMAGES:
        full, quick = encoder.prepare(data), encoder.describe(data)
        assert (quick.content_hash, quick.num_tokens, quick.grid) == (full.content_hash, full.num_tokens, full.grid)
        assert (quick.pixel_values.numel() == 0) == (family == "llava")
    with pytest.raises(ValueError, match="decoded"):
        encoder.describe(b"not an image")

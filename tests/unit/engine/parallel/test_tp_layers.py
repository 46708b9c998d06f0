"""The tensor-parallel Llama layers against the whole model: two gloo ranks in threads of this
process each load their shard of a tiny model (`setup`'s loader path: shard config + shard rules)
and run one prefill forward; their logits equal the TP=1 model's. Covers untied and tied
embeddings (vocab-parallel LM head sharing the embedding), q/k/v biases (Qwen2), Qwen3's q/k
norms and a head_dim that is not hidden / heads (Llama-3 rope)."""
from __future__ import annotations

import threading

import pytest
import torch

from baton.services.engine.attention.base import AttentionMetadata, SequenceSlice
from baton.services.engine.attention.torch_cpu import TorchAttentionBackend
from baton.services.engine.kv.kv_cache import KVCache, KVLayout
from baton.services.engine.models.loader import load_model
from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.parallel import group as tp_group
from baton.services.engine.parallel.layers import TPLlamaForCausalLM, shard_config, shard_tensor
from tests.helpers.tiny_models import make_tiny_model

CASES = {"llama": {}, "llama3_rope": {}, "qwen2": {}, "qwen3": {"num_key_value_heads": 2}}


def logits_of(model, cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    kv = KVCache(KVLayout(cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32), torch.device("cpu"))
    backend = TorchAttentionBackend(kv, cfg.num_heads, cfg.head_dim)
    n = len(ids)
    slots = torch.arange(n)
    meta = AttentionMetadata(seqs=[SequenceSlice(0, n, 0, context_slots=slots)], slot_mapping=slots)
    with torch.inference_mode():
        backend.prepare(meta)
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), backend, meta))


@pytest.mark.parametrize("family", sorted(CASES))
def test_two_ranks_equal_the_whole_model(family, tmp_path):
    folder = make_tiny_model(family, tmp_path / family, **CASES[family])
    cfg = ModelConfig.from_folder(folder)
    ids = [5, 17, 301, 2, 99, 42, 7]
    cpu = torch.device("cpu")
    expected = logits_of(load_model(folder, cfg, torch.float32, cpu, fused=False), cfg, ids)
    store = tp_group.open_store(2)
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            group = tp_group.connect(store if r == 0 else tp_group.join_store(store.port, 2), r, 2, cpu)
            local = shard_config(cfg, 2)
            model = load_model(folder, local, torch.float32, cpu, fused=False,
                               build=lambda c, fused: TPLlamaForCausalLM(c, fused, group),
                               shard=lambda name, t: shard_tensor(name, t, r, 2, cfg.vocab_size))
            got[r] = logits_of(model, local, ids)
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for r in (0, 1):
        assert got[r].shape == expected.shape
        torch.testing.assert_close(got[r], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[r].argmax(-1), expected.argmax(-1))

"""Tensor-parallel pieces that need no second process: the step message, the shard rules, the
shard config's refusals, and two gloo ranks in threads of this process (the collectives and the
vocab-parallel embedding / LM head against the whole matrices)."""
from __future__ import annotations

import threading

import pytest
import torch

from baton.services.engine.models.model_config import ModelConfig
from baton.services.engine.parallel import group as tp_group
from baton.services.engine.parallel.layers import VocabParallelEmbedding, shard_config, shard_tensor, vocab_slice
from baton.services.engine.parallel.step import OP_STEP, StepMessage


def test_step_message_round_trips() -> None:
    message = StepMessage(OP_STEP, 7, [(0, 5, 0), (5, 1, 9), (6, 1, 3)], 3, False, [[4, 2], [1, 8, 9], [0]], [1, 2])
    data = message.encode()
    header, body = data[:64], data[64:]
    assert StepMessage.body_bytes(header) == len(body)
    assert StepMessage.decode(header, body) == message
    assert message.tensor_len == 3 * 7 + 3


def test_shard_rules() -> None:
    full = torch.arange(5 * 6, dtype=torch.float32).view(5, 6)
    assert torch.equal(shard_tensor("model.layers.0.self_attn.o_proj.weight", full[:4], 1, 2, 5), full[:4, 3:])
    assert torch.equal(shard_tensor("model.layers.3.mlp.up_proj.weight", full[:4], 1, 2, 5), full[2:4])
    assert torch.equal(shard_tensor("model.norm.weight", full[0], 1, 2, 5), full[0])
    last = shard_tensor("lm_head.weight", full, 1, 2, 5)  # 5 rows over 2 ranks: 3 each, the last padded
    assert vocab_slice(5, 2) == 3 and torch.equal(last[:2], full[3:]) and not last[2].any()


def test_shard_config_splits_heads_or_refuses() -> None:
    cfg = ModelConfig(family="llama", vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=2, rms_norm_eps=1e-6, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=False, qk_norm=False, sliding_window=None)
    local = shard_config(cfg, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (2, 1, 6, 10)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) is not divisible by --tp 4"):
        shard_config(cfg, 4)


def test_two_gloo_ranks_in_threads() -> None:
    store = tp_group.open_store(2)
    torch.manual_seed(0)
    table = torch.randn(5, 3)
    ids = torch.tensor([0, 4, 2, 3])
    results: dict[int, tuple] = {}

    def rank(r: int) -> None:
        group = tp_group.connect(store if r == 0 else tp_group.join_store(store.port, 2), r, 2, torch.device("cpu"))
        emb = VocabParallelEmbedding(5, 3, group)
        with torch.no_grad():
            emb.weight.copy_(shard_tensor("model.embed_tokens.weight", table, r, 2, 5))
        x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * (r + 1)
        results[r] = (emb(ids), group.all_gather_last(x), group.all_reduce(x.clone()), group.min_int(10 - r),
                      group.broadcast(torch.tensor([7, 8]) if r == 0 else torch.zeros(2, dtype=torch.long)))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in (0, 1):
        embedded, gathered, reduced, smallest, sent = results[r]
        assert torch.equal(embedded, table[ids])
        assert torch.equal(gathered, torch.tensor([[1.0, 2.0, 2.0, 4.0], [3.0, 4.0, 6.0, 8.0]]))
        assert torch.equal(reduced, torch.tensor([[3.0, 6.0], [9.0, 12.0]]))
        assert smallest == 9 and sent.tolist() == [7, 8]

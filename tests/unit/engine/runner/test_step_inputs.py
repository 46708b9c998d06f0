"""The eager step's flattened inputs (`ModelRunner.prepare`, built with numpy per step) equal the
per-token definition: token ids, positions and KV slots read one by one off each request's
tokens and block table, sampled rows, block tables and (for the CPU backend) context slots,
on a real tiny engine's mixed steps: decodes, first and later prefill chunks, chunks that span
pages, and recomputed output tokens after a preemption."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from baton.services.engine.config import EngineConfig
from baton.services.engine.engine import Engine
from baton.services.engine.request import PENDING_TOKEN
from baton.services.engine.runner.positions import context_slots, step_positions, step_slots, token_array
from baton.services.engine.sampling_params import SamplingParams
from tests.helpers.tiny_models import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("step_inputs"))


def expected(items, page):
    """The step's inputs by definition, one token at a time."""
    ids, positions, slots, rows = [], [], [], []
    for item in items:
        req = item.request
        tokens = req.prompt_token_ids + req.output_token_ids
        for pos in range(item.start, item.start + item.num_tokens):
            ids.append(tokens[pos])
            positions.append(pos)
            slots.append(req.block_table[pos // page] * page + pos % page)
        if item.samples:
            rows.append(len(ids) - 1)
    return ids, positions, slots, rows


def checked(engine):
    """The engine with every step's inputs compared to `expected` as they are built; returns the
    list that collects each step's (decodes, multi-token sequences, whether a multi-token sequence
    reads output tokens)."""
    prepare, page, shapes = engine.runner.prepare, engine.config.page_size, []

    def prepare_and_check(items):
        backend = engine.runner.backend
        backend.uses_context_slots = False  # as the GPU backend reads them: block tables, no context slots
        try:
            block_tables_only = prepare(items)
        finally:
            del backend.uses_context_slots
        inputs = prepare(items)
        ids, positions, slots, rows = expected(items, page)
        assert PENDING_TOKEN not in ids, "overlap is off: no placeholder reaches the inputs"
        for got in (block_tables_only, inputs):
            assert got.input_ids.tolist() == ids
            assert got.positions.tolist() == positions
            assert got.meta.slot_mapping.tolist() == slots
            assert got.sample_rows.tolist() == rows
            assert got.all_rows_sample == (len(rows) == len(ids))
        assert all(seq.context_slots is None for seq in block_tables_only.meta.seqs)
        assert block_tables_only.meta.block_tables == inputs.meta.block_tables
        first = 0
        for item, seq, table in zip(items, inputs.meta.seqs, inputs.meta.block_tables, strict=True):
            end = item.start + item.num_tokens
            assert (seq.query_start, seq.query_len, seq.prefix_len) == (first, item.num_tokens, item.start)
            assert table == item.request.block_table[:-(-end // page)]
            assert seq.context_slots.tolist() == [table[p // page] * page + p % page for p in range(end)]
            first += item.num_tokens
        shapes.append((sum(i.num_tokens == 1 for i in items), sum(i.num_tokens > 1 for i in items),
                       any(i.num_tokens > 1 and i.start + i.num_tokens > len(i.request.prompt_token_ids)
                           for i in items)))
        return inputs

    engine.runner.prepare = prepare_and_check
    return shapes


def test_mixed_steps_flatten_as_defined(folder):
    engine = Engine(EngineConfig(model=str(folder), page_size=4, kv_cache_tokens=4096, chunked_prefill_size=11,
                                 max_num_batched_tokens=40, num_threads=1))
    shapes = checked(engine)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i in range(7):
        engine.add_request(f"r{i}", [rng.randrange(3, VOCAB) for _ in range(rng.choice([1, 3, 9, 17, 30]))], params)
    while engine.has_unfinished():
        engine.step()
    assert any(d and m >= 2 for d, m, _ in shapes), f"no step mixed decodes with several chunks: {shapes}"
    engine.check_idle_integrity()


def test_recomputed_outputs_after_preemption_flatten_as_defined(folder):
    engine = Engine(EngineConfig(model=str(folder), page_size=4, kv_cache_tokens=96, chunked_prefill_size=16,
                                 max_num_batched_tokens=48, num_threads=1))
    shapes = checked(engine)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", [3 + (7 * i + j) % 300 for j in range(14)], params)
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert any(recomputed for _, _, recomputed in shapes), "no chunk recomputed output tokens"
    engine.check_idle_integrity()


def test_position_and_slot_helpers_on_ragged_sequences():
    rng = random.Random(1)
    page = 8
    starts = [rng.randrange(0, 50) for _ in range(9)]
    lens = [rng.choice([1, 1, 2, 7, 8, 9, 30]) for _ in starts]
    tables = [rng.sample(range(500), -(-(s + n) // page)) for s, n in zip(starts, lens)]
    firsts = list(np.cumsum([0] + lens[:-1]))
    count = sum(lens)
    blocks, base = [], []
    for s, n, t in zip(starts, lens, tables):
        base.append(len(blocks) - s // page)
        blocks.extend(t[s // page:(s + n - 1) // page + 1])
    positions = np.empty(count, dtype=np.int64)
    slots = np.empty(count, dtype=np.int64)
    step_slots(positions, step_positions(starts, lens, firsts, count, positions), blocks, base, page, slots)
    want_pos = [p for s, n in zip(starts, lens) for p in range(s, s + n)]
    want_slots = [t[p // page] * page + p % page for s, n, t in zip(starts, lens, tables) for p in range(s, s + n)]
    assert positions.tolist() == want_pos and slots.tolist() == want_slots
    views = context_slots(tables, [s + n for s, n in zip(starts, lens)], page, torch.device("cpu"))
    for view, s, n, t in zip(views, starts, lens, tables):
        assert view.tolist() == [t[p // page] * page + p % page for p in range(s + n)]


def test_token_array_reads_prompt_and_outputs(folder):
    engine = Engine(EngineConfig(model=str(folder), page_size=4, kv_cache_tokens=256, num_threads=1))
    engine.add_request("a", list(range(3, 13)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    request = engine.scheduler.waiting_requests()[0]
    request.output_token_ids.extend([40, 41, PENDING_TOKEN])
    assert token_array(request, 2, 6).tolist() == [5, 6, 7, 8]
    assert token_array(request, 8, 13).tolist() == [11, 12, 40, 41, PENDING_TOKEN]
    assert token_array(request, 10, 12).tolist() == [40, 41]
    engine.abort("a")

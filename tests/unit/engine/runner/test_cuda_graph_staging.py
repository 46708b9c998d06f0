"""CudaGraphRunner's host side on the CPU (capture and replay need a GPU: tests/gpu/test_cuda_graph.py):
the static buffers it allocates, the decode plans it asks the backend for, and how `stage`
fills the double-buffered host mirror (rows, padding rows, the placeholder gather index)."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from baton.services.engine.request import PENDING_TOKEN, Request
from baton.services.engine.runner.cuda_graph import CudaGraphRunner
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.scheduling.scheduler import ScheduledItem

PAGE, MAX_LEN, SIZES = 4, 64, [1, 2, 4]
WIDTH = MAX_LEN // PAGE


class FakeBackend:
    num_kv_heads, num_sms = 2, 8

    def __init__(self):
        self.plans = []

    def graph_decode_plan(self, table, lens, rows, splits):
        self.plans.append((tuple(table.shape), lens.numel(), rows.tolist(), splits))
        return f"plan{lens.numel()}"


@pytest.fixture
def graphs(monkeypatch):
    kernels = types.ModuleType("triton_kernels")
    kernels.num_decode_splits = lambda bs, heads, longest, sms: 100 + bs  # the real one needs Triton
    monkeypatch.setitem(sys.modules, "baton.services.engine.attention.triton_kernels", kernels)
    model = SimpleNamespace(config=SimpleNamespace(sliding_window=None, vocab_size=10),
                            lm_head=SimpleNamespace(weight=torch.zeros(10, 3)))
    runner = CudaGraphRunner(model, FakeBackend(), PAGE, torch.device("cpu"), MAX_LEN,
                             prev_tokens=torch.zeros(8, dtype=torch.int32))
    assert [(bs, plan) for bs, plan in runner._allocate(SIZES)] == [(1, "plan1"), (2, "plan2"), (4, "plan4")]
    runner.batch_sizes = SIZES  # what capture sets once the graphs exist
    return runner


def decoding(rid, prompt_len, outputs, table, pending_row=-1):
    req = Request(request_id=rid, parent_id=rid, index=0, prompt_token_ids=list(range(3, 3 + prompt_len)),
                  params=SamplingParams(), arrival=0, output_token_ids=list(outputs), block_table=list(table))
    req.pending_row = pending_row
    return req


def mirror(runner, k):
    ids, pos, slots, lens, gidx, table = runner._host_views[k]
    return ids.tolist(), pos.tolist(), slots.tolist(), lens.tolist(), gidx.tolist(), table


def test_buffers_and_plans(graphs):
    assert graphs.backend.plans == [((1, WIDTH), 1, [0], 101), ((2, WIDTH), 2, [0, 1], 102),
                                    ((4, WIDTH), 4, [0, 1, 2, 3], 104)]
    for k in (0, 1):
        ids, pos, slots, lens, gidx, table = mirror(graphs, k)
        assert (ids, pos, slots, lens, gidx) == ([0] * 4, [0] * 4, [-1] * 4, [1] * 4, [-1] * 4)
        assert table.shape == (4, WIDTH)
    assert graphs._static.tolist() == graphs._hosts[0].tolist()
    assert tuple(graphs._s_logits.shape) == (4, 10)


def test_stage_fills_rows_then_padding_alternating_mirrors(graphs):
    pending = decoding("p", 5, [PENDING_TOKEN], [7, 2], pending_row=3)   # position 5: block 2, offset 1
    plain = decoding("q", 9, [42], [4, 5, 6])                          # position 9: block 6, offset 1
    graphs.stage([ScheduledItem(pending, 5, 1), ScheduledItem(plain, 9, 1)])
    assert graphs._staged == (0, 2, True, 3) and graphs._host_next == 1  # the widest row has 3 blocks
    ids, pos, slots, lens, gidx, _ = mirror(graphs, 0)
    table = graphs.packed_tables(0, 2, 3)  # rows packed to 3 columns, not WIDTH: replay copies 2 x 3 ids
    assert ids[:2] == [PENDING_TOKEN, 42] and pos[:2] == [5, 9]
    assert slots[:2] == [2 * PAGE + 1, 6 * PAGE + 1] and lens[:2] == [6, 10]
    assert gidx[:2] == [3, -1]  # the placeholder's token comes from prev_tokens[3] on the GPU
    assert table[0, :2].tolist() == [7, 2] and table[1, :3].tolist() == [4, 5, 6]

    behind = decoding("r", 4, [8, 9], [1, 3])  # recomputing: position 4 is not its newest token
    graphs.stage([ScheduledItem(plain, 9, 1), ScheduledItem(behind, 4, 1), ScheduledItem(pending, 5, 1)])
    assert graphs._staged == (1, 4, False, 3) and graphs._host_next == 0
    assert graphs.packed_tables(1, 4, 3)[:3].tolist() == [[4, 5, 6], [1, 3, 0], [7, 2, 0]]
    ids, pos, slots, lens, gidx, _ = mirror(graphs, 1)
    assert ids == [42, 8, PENDING_TOKEN, 0] and pos == [9, 4, 5, 0]
    assert slots == [6 * PAGE + 1, 3 * PAGE, 2 * PAGE + 1, -1] and lens == [10, 5, 6, 1]
    assert gidx == [-1, -1, 3, -1]  # row 3 pads: stores nothing, attends to one key

    graphs.stage([ScheduledItem(plain, 9, 1)])  # back on mirror 0: rows past the batch size stay as they were
    assert graphs._staged == (0, 1, True, 3)
    ids, pos, slots, lens, gidx, _ = mirror(graphs, 0)
    assert ids[:2] == [42, 42] and slots[:2] == [6 * PAGE + 1, 6 * PAGE + 1]


def test_can_replay_only_decode_steps_up_to_the_largest_graph(graphs):
    reqs = [decoding(f"r{i}", 4, [5], [i]) for i in range(5)]
    assert graphs.can_replay([ScheduledItem(r, 4, 1) for r in reqs[:4]])
    assert not graphs.can_replay([ScheduledItem(r, 4, 1) for r in reqs])
    assert not graphs.can_replay([ScheduledItem(reqs[0], 3, 2)])


def test_supported_only_on_cuda_with_a_fused_model_and_a_planning_backend():
    fused = SimpleNamespace(fused=True)
    assert not CudaGraphRunner.supported(fused, FakeBackend(), torch.device("cpu"))
    assert not CudaGraphRunner.supported(SimpleNamespace(fused=False), FakeBackend(), torch.device("cuda"))
    assert not CudaGraphRunner.supported(fused, object(), torch.device("cuda"))
    assert CudaGraphRunner.supported(fused, FakeBackend(), torch.device("cuda"))

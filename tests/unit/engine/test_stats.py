"""EngineStats: a frozen record with a doc line per field, and the exact figures an engine
reports through a reservation, a queued request, a finished one and a prefix-cache hit."""
import ast
import dataclasses
import inspect

import pytest

from baton.services.engine import stats as stats_module
from baton.services.engine.config import EngineConfig
from baton.services.engine.disagg import DisaggEngine
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.stats import EngineStats
from tests.helpers.tiny_models import make_tiny_model

PAGE, BLOCKS = 4, 16


def test_frozen_with_one_doc_line_per_field():
    fields = [f.name for f in dataclasses.fields(EngineStats)]
    body = next(n for n in ast.parse(inspect.getsource(stats_module)).body
                if isinstance(n, ast.ClassDef) and n.name == "EngineStats").body
    documented = [a.target.id for a, doc in zip(body, body[1:])
                  if isinstance(a, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)]
    assert documented == fields
    record = EngineStats(**{name: 0 for name in fields})
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.running_requests = 1


def test_figures_through_a_reservation_a_queue_and_a_cache_hit(tmp_path):
    engine = DisaggEngine(EngineConfig(model=str(make_tiny_model("llama", tmp_path)), page_size=PAGE,
                                       kv_cache_tokens=PAGE * BLOCKS, num_threads=1))
    zero = dict(running_requests=0, waiting_requests=0, running_tokens=0, waiting_tokens=0, reserved_requests=0,
                reserved_tokens=0, reserved_blocks=0, total_blocks=BLOCKS, free_blocks=BLOCKS, cached_blocks=0,
                evictable_blocks=0, kv_usage=0.0, free_kv_tokens=PAGE * BLOCKS, prefix_hit_rate=0.0,
                prefix_tokens_matched=0, prefix_tokens_looked_up=0, preemptions=0)
    assert engine.stats() == EngineStats(**zero)

    engine.reserve("a", list(range(3, 10)), SamplingParams(max_tokens=2))  # 7 tokens: 2 blocks, 6 looked up
    engine.add_request("b", list(range(20, 25)), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert engine.stats() == EngineStats(**zero | dict(
        waiting_requests=1, waiting_tokens=5, reserved_requests=1, reserved_tokens=7, reserved_blocks=2,
        free_blocks=BLOCKS - 2, kv_usage=2 / BLOCKS, free_kv_tokens=PAGE * (BLOCKS - 2), prefix_tokens_looked_up=6))

    engine.step()  # b prefills its 5 tokens (2 blocks) and samples one
    assert engine.stats() == EngineStats(**zero | dict(
        running_requests=1, running_tokens=6, reserved_requests=1, reserved_tokens=7, reserved_blocks=2,
        free_blocks=BLOCKS - 4, kv_usage=4 / BLOCKS, free_kv_tokens=PAGE * (BLOCKS - 4), prefix_tokens_looked_up=10))

    engine.cancel_reservation("a")
    while engine.has_unfinished():
        engine.step()
    # b computed 7 tokens: its first page stays cached (evictable), everything else is free
    after = zero | dict(free_blocks=BLOCKS - 1, cached_blocks=1, evictable_blocks=1, prefix_tokens_looked_up=10)
    assert engine.stats() == EngineStats(**after)

    engine.add_request("c", list(range(20, 25)), SamplingParams(temperature=0.0, max_tokens=1))
    engine.step()
    assert engine.stats() == EngineStats(**after | dict(prefix_tokens_matched=4, prefix_tokens_looked_up=14,
                                                        prefix_hit_rate=4 / 14))
    engine.check_idle_integrity()

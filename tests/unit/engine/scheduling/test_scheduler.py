"""Scheduler behaviour through a real (tiny) engine: token budget, chunked prefill mixed
with decode, admission order per policy, max running requests, preemption and abort."""
import pytest

from baton.services.engine.config import EngineConfig
from baton.services.engine.engine import Engine
from baton.services.engine.sampling_params import SamplingParams
from tests.helpers.tiny_models import make_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("sched"))


@pytest.fixture
def engine_factory(folder):
    engines = []

    def make(**options):
        options = dict(model=str(folder), page_size=4, kv_cache_tokens=1024, num_threads=1) | options
        engine = Engine(EngineConfig(**options))
        engines.append(engine)
        return engine
    yield make
    for engine in engines:
        while engine.has_unfinished():
            engine.step()
        engine.check_idle_integrity()


def prompt(n, start=3):
    return [start + (i % 300) for i in range(n)]


def test_chunked_prefill_mixes_with_decode_under_the_token_budget(engine_factory):
    engine = engine_factory(chunked_prefill_size=16, max_num_batched_tokens=20)
    engine.add_request("short", prompt(5), SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    engine.step()
    assert engine.last_schedule == [("short", 0, 5)]
    engine.add_request("long", prompt(50, 7), GREEDY)
    steps = []
    for _ in range(4):
        engine.step()
        steps.append(engine.last_schedule)
    assert steps[0] == [("short", 5, 1), ("long", 0, 16)]
    assert steps[1] == [("short", 6, 1), ("long", 16, 16)]
    assert steps[2] == [("short", 7, 1), ("long", 32, 16)]
    assert steps[3] == [("short", 8, 1), ("long", 48, 2)]
    assert all(sum(n for _, _, n in step) <= 20 for step in steps)


def test_unchunked_prefill_takes_the_whole_prompt(engine_factory):
    engine = engine_factory(chunked_prefill_size=-1, max_num_batched_tokens=8)
    engine.add_request("a", prompt(30), GREEDY)
    engine.add_request("b", prompt(30, 9), GREEDY)
    engine.step()
    assert engine.last_schedule == [("a", 0, 30)]  # b waits: no room left in this step's budget
    engine.step()
    assert engine.last_schedule == [("a", 30, 1)]  # still no room for a whole 30-token prompt
    engine.abort("b")


@pytest.mark.parametrize("policy,expected", [("fcfs", ["x", "y", "z"]), ("priority", ["z", "x", "y"])])
def test_admission_order_follows_policy(engine_factory, policy, expected):
    engine = engine_factory(schedule_policy=policy, max_running_requests=1)
    for rid, prio in [("x", 5), ("y", 7), ("z", 1)]:
        engine.add_request(rid, prompt(6, ord(rid)), SamplingParams(temperature=0.0, max_tokens=1, priority=prio))
    admitted = []
    while engine.has_unfinished():
        engine.step()
        admitted += [rid for rid, start, _ in engine.last_schedule if start == 0]
    assert admitted == expected


def test_lpm_admits_longest_cached_prefix_first(engine_factory):
    engine = engine_factory(schedule_policy="lpm", max_running_requests=1)
    engine.add_request("warm", prompt(24), GREEDY)
    while engine.has_unfinished():
        engine.step()
    engine.add_request("cold", prompt(24, 100), GREEDY)
    engine.add_request("hot", prompt(24) + [9, 9], GREEDY)
    engine.step()
    assert engine.last_schedule == [("hot", 24, 2)]  # 24 cached tokens, only 2 computed


def test_max_running_requests_caps_the_batch(engine_factory):
    engine = engine_factory(max_running_requests=2)
    for i in range(4):
        engine.add_request(f"r{i}", prompt(6, 10 * i + 3), GREEDY)
    engine.step()
    assert [rid for rid, _, _ in engine.last_schedule] == ["r0", "r1"]
    stats = engine.stats()
    assert stats.running_requests == 2 and stats.waiting_requests == 2
    assert stats.running_tokens == 2 * (6 + 1) and stats.waiting_tokens == 2 * 6  # each sampled one token


def test_preemption_releases_the_newest_request_and_requeues_it_first(engine_factory):
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens need 2 blocks each, then grow.
    engine = engine_factory(kv_cache_tokens=24, disable_radix_cache=True)
    long_params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request("old", prompt(8), long_params)
    engine.add_request("new", prompt(8, 50), long_params)
    preempted_seen = False
    while engine.has_unfinished():
        engine.step()
        waiting = engine.scheduler.waiting_requests()
        if not preempted_seen and waiting and waiting[0].request_id == "new":
            preempted_seen = True
            assert waiting[0].block_table == []
            assert [r.request_id for r in engine.scheduler.running_requests()] == ["old"]
    assert preempted_seen and engine.stats().preemptions >= 1


def test_abort_waiting_and_running_requests_returns_blocks(engine_factory):
    engine = engine_factory(max_running_requests=1)
    engine.add_request("run", prompt(10), SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("wait", prompt(10, 40), GREEDY)
    engine.step()
    free_before = engine.pool.num_free
    assert [d.finish_reason for d in engine.abort("wait")] == ["abort"]
    assert engine.pool.num_free == free_before
    assert [d.finish_reason for d in engine.abort("run")] == ["abort"]
    assert engine.abort("run") == []  # unknown / already gone
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats.free_blocks + stats.cached_blocks == stats.total_blocks


def test_bad_requests_are_refused_before_taking_resources(engine_factory):
    engine = engine_factory(max_model_len=64)
    free = engine.pool.num_free
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", prompt(64), GREEDY)
    engine.add_request("dup", prompt(4), GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", prompt(4), GREEDY)
    assert engine.pool.num_free == free


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="page_size"):
        EngineConfig(page_size=0)
    with pytest.raises(ValueError, match="schedule_policy"):
        EngineConfig(schedule_policy="random")
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        EngineConfig(chunked_prefill_size=0)

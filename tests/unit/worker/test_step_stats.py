"""StepStats through a real EngineThread on a tiny engine: one step's deltas reach their streams
in order, and the stats line counts the steps, the prefill and decode tokens and the queue."""
import asyncio

import pytest

from baton.services.engine.config import EngineConfig
from baton.services.engine.disagg import DisaggEngine
from baton.services.engine.sampling_params import SamplingParams
from baton.services.worker.engine_thread import EngineThread
from baton.services.worker.step_stats import StepStats
from tests.helpers.tiny_models import make_tiny_model


def test_counts_prefill_decode_and_mixed_steps():
    stats = StepStats(interval_s=5.0, clock=lambda: 0.0)
    stats.record_step(0.010, [("a", 0, 7)], 1)               # a prefill
    stats.record_step(0.004, [("a", 7, 1), ("b", 0, 5)], 2)   # a decode with b's prefill: mixed
    stats.record_step(0.002, [("a", 8, 1), ("b", 5, 1)], 2)   # two decodes
    stats.record_command(0.001)
    w = stats.window
    assert (w.steps, w.prefill_tokens, w.decode_tokens, w.mixed_steps, w.deltas) == (3, 12, 3, 1, 5)
    assert w.longest_step_s == pytest.approx(0.010) and w.step_s == pytest.approx(0.016)


def test_disabled_logs_nothing():
    assert StepStats(0.0).maybe_log(engine=None) is None


def test_engine_thread_delivers_a_step_at_once_and_logs_its_window(tmp_path):
    engine = DisaggEngine(EngineConfig(model=str(make_tiny_model("llama", tmp_path)), page_size=4,
                                       kv_cache_tokens=256, num_threads=1))

    async def main():
        thread = EngineThread(engine, asyncio.get_running_loop(), stats_interval_s=3600.0)
        streams = {rid: thread.open_stream(rid) for rid in ("a", "b")}
        thread.start()
        try:
            params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
            await thread.call(lambda e: e.add_request("a", list(range(3, 12)), params))
            await thread.call(lambda e: e.add_request("b", list(range(20, 26)), params))
            tokens = {rid: [] for rid in streams}
            for rid, stream in streams.items():
                while True:
                    delta = await asyncio.wait_for(stream.get(), 60)
                    tokens[rid] += delta.new_token_ids
                    if delta.finish_reason:
                        break
            window = thread.step_stats.window
            line = await thread.call(lambda e: thread.step_stats.format(1.0, e))
            return tokens, window, line
        finally:
            thread.stop()

    tokens, window, line = asyncio.run(main())
    assert [len(t) for t in tokens.values()] == [4, 4]
    assert window.prefill_tokens == 9 + 6          # both prompts, each once
    assert window.deltas == 8 and window.steps >= 4
    assert window.decode_tokens == 6               # the first token of each comes from its prefill step
    assert "running 0, waiting 0" in line and f"{window.steps}.0 steps/s" in line


def test_a_failing_stats_line_turns_the_stats_off_and_the_engine_steps_on(tmp_path):
    engine = DisaggEngine(EngineConfig(model=str(make_tiny_model("llama", tmp_path)), page_size=4,
                                       kv_cache_tokens=256, num_threads=1))

    def broken_stats():  # failure injection: the line's reading of the engine raises
        raise RuntimeError("stats broke")

    async def main():
        thread = EngineThread(engine, asyncio.get_running_loop(), stats_interval_s=1e-9)
        stream = thread.open_stream("a")
        thread.start()
        try:
            await thread.call(lambda e: setattr(e, "stats", broken_stats))
            params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
            await thread.call(lambda e: e.add_request("a", list(range(3, 12)), params))
            tokens = []
            while True:
                delta = await asyncio.wait_for(stream.get(), 60)
                tokens += delta.new_token_ids
                if delta.finish_reason:
                    return tokens, thread.step_stats.recording
        finally:
            thread.stop()

    tokens, recording = asyncio.run(main())
    assert len(tokens) == 5 and not recording

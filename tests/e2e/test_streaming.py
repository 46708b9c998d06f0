"""Tokens reach an SSE client as decode produces them, one engine step per event, also while
the worker is saturated by other requests (real `baton up` on the embedded SmolLM2).

Each event's `usage.completion_tokens` (stream_options.continuous_usage_stats) must grow by
exactly one, and the events must arrive spread over the generation's duration, not in a
burst at its end.
"""
import asyncio
import json
import statistics
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

MAX_TOKENS = 48


async def _stream(base: str, prompt: str, max_tokens: int) -> list[tuple[float, dict]]:
    """(arrival time, event) for each SSE event of one streamed completion."""
    body = {"model": "any", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = []
    async with httpx.AsyncClient(timeout=180) as client:
        models = (await client.get(base + "/v1/models")).json()
        body["model"] = models["data"][0]["id"]
        async with client.stream("POST", base + "/v1/completions", json=body) as reply:
            assert reply.status_code == 200, await reply.aread()
            async for line in reply.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append((time.monotonic(), json.loads(line[len("data: "):])))
    return events


def _check_one_step_per_event(events: list[tuple[float, dict]], max_tokens: int) -> None:
    token_events = [(t, e) for t, e in events if e["choices"]]
    counts = [e["usage"]["completion_tokens"] for _, e in token_events]
    assert counts == list(range(1, max_tokens + 1)), counts
    times = [t for t, _ in token_events]
    span = times[-1] - times[0]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Written as they happen: the stream spans the generation, no burst at the end.
    assert span > 0 and statistics.median(gaps) > 0.2 * span / len(gaps), (span, gaps)
    assert sum(1 for g in gaps if g < 1e-4) < len(gaps) // 4, gaps


def test_sse_events_carry_one_step_each(baton_up):
    events = asyncio.run(_stream(baton_up, "Count slowly from one to fifty:", MAX_TOKENS))
    _check_one_step_per_event(events, MAX_TOKENS)


def test_sse_one_step_per_event_while_saturated(baton_up):
    async def scenario():
        load = [asyncio.create_task(_stream(baton_up, f"Tell story number {i}.", 96)) for i in range(12)]
        await asyncio.sleep(1.0)  # the others are running when the measured stream starts
        measured = await _stream(baton_up, "List the planets of the solar system:", MAX_TOKENS)
        others = await asyncio.gather(*load)
        return measured, others
    measured, others = asyncio.run(scenario())
    _check_one_step_per_event(measured, MAX_TOKENS)
    for events in others:
        assert [e["usage"]["completion_tokens"] for _, e in events if e["choices"]] == list(range(1, 97))

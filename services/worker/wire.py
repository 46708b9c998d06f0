"""Conversions between engine records and wire messages shared by the worker services."""
from __future__ import annotations

from typing import Any, Optional

from baton.protos.baton.v1 import common_pb2, worker_pb2
from baton.services.engine.request import RequestDelta
from baton.services.engine.resume import ResumedCompletion


def logprob_to_proto(entry: dict[str, Any]) -> common_pb2.TokenLogprob:
    """An engine logprob entry as a TokenLogprob message."""
    return common_pb2.TokenLogprob(
        token_id=entry["token_id"], logprob=entry["logprob"],
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in entry["top_logprobs"]])


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> tuple[float, list[tuple[int, float]]]:
    """(logprob, top alternatives) of a TokenLogprob message."""
    return msg.logprob, [(t.token_id, t.logprob) for t in msg.top_logprobs]


def delta_to_proto(delta: RequestDelta, completion_tokens: Optional[int] = None) -> worker_pb2.DecodeResponse:
    """A streamed chunk; usage is attached to a completion's final chunk (prompt logprobs, when asked
    for, to its first)."""
    response = worker_pb2.DecodeResponse(
        request_id=delta.parent_id, index=delta.index, token_ids=delta.new_token_ids, text=delta.new_text,
        logprobs=[logprob_to_proto(e) for e in delta.new_logprobs],
        finish_reason=delta.finish_reason or "",
        stop_reason="" if delta.stop_reason is None else str(delta.stop_reason),
        prompt_logprobs=[logprob_to_proto(e) for e in delta.prompt_logprobs],
    )
    if delta.finish_reason is not None and completion_tokens is not None:
        response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=delta.num_prompt_tokens,
                                                 completion_tokens=completion_tokens,
                                                 cached_tokens=delta.num_cached_tokens))
    return response


def worker_load(engine: Any, transfer: Any = None, transfer_failures: int = 0,
                max_requests: int = 0) -> worker_pb2.WorkerLoad:
    """The engine's current load (and cumulative cache / transfer counters) as the router sees it;
    `max_requests`: how many requests the worker accepts at once (0: unbounded)."""
    stats = engine.stats()
    return worker_pb2.WorkerLoad(
        max_requests=max_requests, reserved_requests=stats.reserved_requests,
        reserved_tokens=stats.reserved_tokens, free_kv_tokens=stats.free_kv_tokens,
        running_requests=stats.running_requests, queued_requests=stats.waiting_requests,
        running_tokens=stats.running_tokens, queued_tokens=stats.waiting_tokens,
        kv_usage=stats.kv_usage, prefix_hit_rate=stats.prefix_hit_rate,
        prefix_tokens_matched=stats.prefix_tokens_matched, prefix_tokens_looked_up=stats.prefix_tokens_looked_up,
        kv_bytes_received=transfer.bytes_received if transfer else 0,
        kv_bytes_sent=transfer.bytes_sent if transfer else 0, kv_transfer_failures=transfer_failures)


def resume_from_proto(entries) -> list[ResumedCompletion]:
    """A DecodeRequest's `resume` entries as the engine's `ResumedCompletion`s."""
    return [ResumedCompletion(index=e.index, output_token_ids=tuple(e.output_token_ids), finished=e.finished)
            for e in entries]

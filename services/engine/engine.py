"""The engine core: `add_request`, `abort` and one pure `step()` (schedule -> run -> update).

No threads, no asyncio, no gRPC: a service or the offline `LLM` drives it by calling
`step()` in a loop and forwarding the `RequestDelta`s it returns. Every bad input is
refused in `add_request` with a `ValueError` before the request holds any resource;
every request's blocks return to the pool when it finishes or is aborted.

Overlap scheduling (CUDA, on unless `disable_overlap_schedule`): a step launches its model
run and sampling with the sampled ids left on the GPU (each sampling request gets the
placeholder `PENDING_TOKEN` as its newest output token), then reads back the tokens of the
step before, which the GPU finished meanwhile, and processes them (stop checks, finish,
deltas): the host schedules and launches step N+1 while the GPU runs step N, and outputs
come one `step()` late. Step N+1's inputs take the placeholders' values on the GPU. A
request that finished at step N already ran in step N+1: that token is discarded, and the
blocks it took are released with the rest. A step whose batch has a request that needs host
state to sample (grammar, penalties, logprobs, prompt logprobs, a held prefill lease: `Request.sync_only`)
first settles the pending step and then runs synchronously, and so does a step of prompts
only while nothing is in flight (an idle engine's new requests get their first token from
that very step). Seeded sampling stays
reproducible: every row still draws its uniform from its own CPU generator, in order.

On CUDA the constructor ends with `warmup()` (unless `skip_warmup`): dummy requests through
`step()` until every kernel variant is compiled, leaving the engine idle and whole (`warmup.py`).
`self.config` is the resolved config (`device_defaults.resolve_config`), never the by-device one.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from baton.services.engine.config import EngineConfig
from baton.services.engine.output.detokenizer import IncrementalDetokenizer
from baton.services.engine.engine_setup import EngineParts, build_engine_parts
from baton.services.engine.output.output_processor import OutputProcessor
from baton.services.engine.request import PENDING_TOKEN, Request, RequestDelta, RequestStatus
from baton.services.engine.resume import ResumedCompletion, replay, resume_by_index
from baton.services.engine.sampling.sampler import Sampler, SamplingRow, make_generator
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.output.stop_checker import StopStringChecker
from baton.services.engine.scheduling.scheduler import ScheduledItem
from baton.services.engine.stats import EngineStats


@dataclass
class _PendingStep:
    """A launched step whose sampled tokens the host has not read yet."""

    requests: list[Request]
    indices: list[int]
    """Where each request's placeholder stands in its output_token_ids."""
    tokens: torch.Tensor
    """Host tensor the sampled ids are being copied into."""
    ready: Optional[torch.cuda.Event]


class Engine:
    """Continuous batching over a paged KV cache with a radix prefix cache."""

    def __init__(self, config: EngineConfig, parts: Optional[EngineParts] = None) -> None:
        self.parts = parts or build_engine_parts(config)
        p = self.parts
        self.config = p.config
        """The resolved config (`device_defaults.resolve_config`): by-device fields are concrete here."""
        self.tokenizer = p.tokenizer
        self.model_config = p.model_config
        self.max_model_len = p.max_model_len
        self.pool, self.cache, self.scheduler, self.runner = p.pool, p.cache, p.scheduler, p.runner
        self.kv_cache = p.kv_cache
        self.sampler = Sampler()
        self.outputs = OutputProcessor(p.eos_token_ids, p.max_model_len)
        self._grammars = None
        self._grammars_lock = threading.Lock()
        self._arrivals = itertools.count()
        self._requests: dict[str, list[Request]] = {}
        self.last_schedule: list[tuple[str, int, int]] = []
        """(request id, first token, token count) of every request in the latest step."""
        self.overlap_schedule = not config.disable_overlap_schedule and self.runner.device.type == "cuda"
        """Overlap the host's work with the device's (see the module doc); may be switched between steps."""
        self._pending: Optional[_PendingStep] = None
        self.num_overlapped_steps = 0
        """Steps launched overlapped so far (the others ran synchronously)."""
        if self.runner.device.type == "cuda" and not self.config.skip_warmup:
            self.warmup()

    def warmup(self) -> None:
        """Run dummy requests through the normal step path until every kernel variant serving uses
        is compiled, then leave the engine idle and whole (see `warmup`); runs at construction on CUDA."""
        from baton.services.engine.warmup import warm_up
        warm_up(self)

    def reset_counters(self) -> None:
        """Zero the since-start counters (prefix-cache lookups, preemptions, overlapped steps)."""
        self.cache.tokens_looked_up = self.cache.tokens_matched = 0
        self.scheduler.num_preemptions = 0
        self.num_overlapped_steps = 0
        self._arrivals = itertools.count()

    # --- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    resume: Optional[Sequence[ResumedCompletion]] = None) -> None:
        """Queue a prompt (n completions); raises ValueError for a bad request. `resume`: what
        each completion already generated elsewhere (a migrated stream, see `resume.py`)."""
        for child in self._new_requests(request_id, prompt_token_ids, params, resume):
            self.scheduler.add(child)

    def _new_requests(self, request_id: str, prompt_token_ids: Sequence[int],
                      params: SamplingParams, resume: Optional[Sequence[ResumedCompletion]] = None) -> list[Request]:
        """Validate and build the n requests of a prompt (registered, not yet queued); a resumed
        completion starts from its replayed state, a finished one is left out."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        self._validate(prompt, params)
        resumed = resume_by_index(resume, params.n, self.model_config.vocab_size)
        self._validate_resumed(prompt, resumed)
        grammars = [None if i in resumed and resumed[i].finished else self._new_grammar(params)
                    for i in range(params.n)]
        children = []
        sync_only = (params.structured_output is not None or params.logprobs is not None
                     or params.prompt_logprobs is not None
                     or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                     or params.presence_penalty != 0.0)
        for i in range(params.n):
            if i in resumed and resumed[i].finished:
                continue
            child_params = params
            if params.seed is not None and i > 0:
                child_params = _with_seed(params, (params.seed + i) % 2**64)
            children.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}", parent_id=request_id,
                index=i, prompt_token_ids=prompt, params=child_params, arrival=next(self._arrivals),
                generator=make_generator(child_params), grammar=grammars[i],
                detokenizer=None if self.config.skip_tokenizer_init else
                IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt),
                stop_checker=StopStringChecker(params.stop, params.include_stop_str_in_output),
                sync_only=sync_only,
            ))
            if i in resumed:
                replay(children[-1], resumed[i].output_token_ids)
        self._requests[request_id] = children
        return children

    def _validate_resumed(self, prompt: list[int], resumed: dict[int, ResumedCompletion]) -> None:
        for entry in resumed.values():
            total = len(prompt) + len(entry.output_token_ids)
            if not entry.finished and total >= self.max_model_len:
                raise ValueError(f"resume: prompt and output hold {total} tokens; this model's context is "
                                 f"{self.max_model_len} tokens, leaving no room to generate")
            if total + 1 > self.pool.num_blocks * self.config.page_size:
                raise ValueError(f"resume: {total} tokens do not fit in the KV cache")

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if self.config.skip_tokenizer_init and params.stop:
            raise ValueError("stop strings need detokenization, which skip_tokenizer_init turns off")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this model's context is {self.max_model_len} "
                             f"tokens, leaving no room to generate")
        if params.prompt_logprobs is not None and params.prompt_logprobs_start >= len(prompt):
            raise ValueError(f"prompt_logprobs_start ({params.prompt_logprobs_start}) must be less than the "
                             f"prompt's length ({len(prompt)})")
        capacity = self.pool.num_blocks * self.config.page_size
        if len(prompt) + 1 > capacity:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the KV cache holds only {capacity}")

    def _new_grammar(self, params: SamplingParams):
        if params.structured_output is None:
            return None
        return self.grammar_cache().new_state(params.structured_output)

    def grammar_cache(self):
        """The compiled-grammar cache (`GrammarCompilerCache`), built on first use. Thread-safe:
        a service compiles a request's grammar into it off the engine thread before adding the
        request, so the step loop never waits for a compile (services/worker/grammar_pool.py)."""
        with self._grammars_lock:
            if self._grammars is None:
                from baton.services.engine.sampling.structured_output import GrammarCompilerCache
                self._grammars = GrammarCompilerCache(self.tokenizer, self.model_config.vocab_size,
                                                      stop_token_ids=self.parts.eos_token_ids, max_threads=2)
            return self._grammars

    def abort(self, request_id: str) -> list[RequestDelta]:
        """Stop a request at once (waiting or running); returns its final deltas ('abort')."""
        deltas = []
        for request in self._requests.pop(request_id, []):
            if request.is_finished:
                continue
            self.scheduler.remove(request)
            request.status, request.finish_reason = RequestStatus.FINISHED, "abort"
            deltas.append(RequestDelta(request.request_id, request.parent_id, request.index, [], "",
                                       finish_reason="abort", num_prompt_tokens=len(request.prompt_token_ids),
                                       num_cached_tokens=request.num_cached_tokens))
        return deltas

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return self.scheduler.has_work()

    def add_image_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                          images: Sequence, **kwargs) -> None:
        """`add_request` for a prompt with images: `images` are its `multimodal.inputs.ImageSpan`s, each
        with its embeddings; the prompt holds one placeholder token per embedding. Raises ValueError
        for a bad request; `kwargs` go to `add_request`."""
        from baton.services.engine.multimodal.inputs import build_state, missing_embeddings
        state = build_state(self.model_config, [int(t) for t in prompt_token_ids], images)
        if missing_embeddings(state):
            raise ValueError("an image span has no embeddings")
        self.add_request(request_id, prompt_token_ids, params, **kwargs)
        for request in self._requests.get(request_id, []):
            request.multimodal = state

    # --- the step ------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Schedule, run the model once, sample, and update every scheduled request.

        With overlap scheduling the deltas returned are those of the step launched by the
        previous call (see the module doc)."""
        items = self.scheduler.schedule()
        if self._pending is None and not self.overlap_schedule:
            return self._run_sync(items)
        sampling = [item.request for item in items if item.samples]
        if items and self.overlap_schedule and self._can_overlap(sampling) and not self._idle_prefill(items):
            self.last_schedule = [(i.request.request_id, i.start, i.num_tokens) for i in items]
            launched = self._launch(items, sampling)
            self.num_overlapped_steps += 1
            deltas = self._settle()
            self._pending = launched
            return deltas
        if self._pending is None:
            return self._run_sync(items)
        deltas = self._settle()
        # requests that finished just now hold no blocks any more: they leave this step
        items = [item for item in items if not item.request.is_finished]
        if not items:  # the next step schedules again, with those blocks free
            return deltas
        return deltas + self._run_sync(items)

    def _run_sync(self, items: list[ScheduledItem]) -> list[RequestDelta]:
        """The synchronous step: run, sample (waiting for the device), update."""
        self.last_schedule = [(i.request.request_id, i.start, i.num_tokens) for i in items]
        if not items:
            return self._starved()
        logits = self.runner.execute(items)
        sampling = [item.request for item in items if item.samples]
        _advance(items)
        if not sampling:
            return []
        grammar_errors: dict[int, str] = {}
        sampled = self.sampler.sample(logits, [self._row(r) for r in sampling],
                                      self._mask_fn(sampling, grammar_errors), mark_empty_rows=True)
        deltas = []
        for row, (request, token) in enumerate(zip(sampling, sampled)):
            if token.empty:  # this request alone cannot go on; its batch does
                deltas.append(self._fail(request, grammar_errors.get(row) or _EMPTY_ROW))
                continue
            delta = self.outputs.on_token(request, token)
            if request.finish_reason is not None:
                self._retire(request)
            deltas.append(delta)
        return deltas

    # --- overlap scheduling --------------------------------------------------------
    def _idle_prefill(self, items: list[ScheduledItem]) -> bool:
        """Nothing in flight and nothing decoding: a step of prompts only (an idle engine's new
        requests). It runs synchronously so their first tokens come out of this step, not the
        next one (about 4 ms sooner at batch 1 on an H200); decoding steps overlap as before."""
        return self._pending is None and all(i.start < len(i.request.prompt_token_ids) for i in items)

    def _can_overlap(self, sampling: list[Request]) -> bool:
        return len(sampling) <= self.runner.max_rows and not any(r.sync_only for r in sampling)

    def _launch(self, items: list[ScheduledItem], sampling: list[Request]) -> Optional[_PendingStep]:
        """Run the model and sample with the tokens left on the device; placeholders stand for them."""
        rows = [self._row(r) for r in sampling]  # bans count the placeholders: they are tokens already
        logits = self.runner.execute(items)
        _advance(items)
        if not sampling:
            return None
        tokens, ready = self.runner.publish_tokens(self.sampler.sample_device(logits, rows))
        indices = []
        for row, request in enumerate(sampling):
            out = request.output_token_ids
            indices.append(len(out))
            out.append(PENDING_TOKEN)
            request.pending_row = row
        return _PendingStep(sampling, indices, tokens, ready)

    def _settle(self) -> list[RequestDelta]:
        """Read back the pending step's tokens and apply them (one step late); [] when none is pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        if pending.ready is not None:
            pending.ready.synchronize()
        deltas = []
        on_resolved = self.outputs.on_resolved
        for request, index, token in zip(pending.requests, pending.indices, pending.tokens.tolist()):
            if request.status is RequestStatus.FINISHED:  # finished (or aborted) earlier: drop the token
                continue
            out = request.output_token_ids
            out[index] = token
            delta = on_resolved(request, token, index + 1)
            if request.finish_reason is not None:
                del out[index + 1:]  # the token of a step it ran in after finishing is discarded
                self._retire(request)
            deltas.append(delta)
        return deltas

    def flush(self) -> list[RequestDelta]:
        """Settle the pending overlapped step now (its deltas); a no-op without one."""
        return self._settle()

    def _row(self, request: Request) -> SamplingRow:
        return SamplingRow(params=request.params, prompt_token_ids=request.prompt_token_ids,
                           output_token_ids=request.output_token_ids, generator=request.generator,
                           banned_token_ids=self.outputs.banned_tokens(request))

    def _mask_fn(self, requests: list[Request], errors: Optional[dict[int, str]] = None):
        """The grammar mask of a batch; a matcher that fails masks its own row entirely (the
        request then fails alone, with the reason in `errors[row]`)."""
        constrained = [(i, r.grammar) for i, r in enumerate(requests) if r.grammar is not None]
        if not constrained:
            return None
        from baton.services.engine.sampling.structured_output import allocate_bitmask, apply_bitmask
        bitmask = allocate_bitmask(len(requests), self.model_config.vocab_size)
        for row, grammar in constrained:
            try:
                grammar.fill_bitmask(bitmask, row)
            except Exception as error:  # xgrammar's C++ errors come as RuntimeError
                bitmask[row].zero_()
                if errors is not None:
                    errors[row] = f"the structured-output constraint failed: {error}"
        return lambda logits: apply_bitmask(logits, bitmask.to(logits.device))

    def _fail(self, request: Request, message: str) -> RequestDelta:
        """End one request with an error (its own fault, e.g. an unsatisfiable grammar)."""
        request.status, request.finish_reason = RequestStatus.FINISHED, "abort"
        self._retire(request)
        return RequestDelta(request.request_id, request.parent_id, request.index, [], "", finish_reason="abort",
                            num_prompt_tokens=len(request.prompt_token_ids),
                            num_cached_tokens=request.num_cached_tokens, error=message)

    def _retire(self, request: Request) -> None:
        request.status = RequestStatus.FINISHED
        self._before_release(request)
        self.scheduler.finish(request)
        siblings = self._requests.get(request.parent_id, [])
        if all(s.is_finished for s in siblings):
            self._requests.pop(request.parent_id, None)

    def _starved(self) -> list[RequestDelta]:
        """Nothing could be scheduled although work waits: the head request cannot fit at all."""
        request = self.scheduler.starved_request()
        if request is None:
            return []
        self.scheduler.remove(request)
        request.status, request.finish_reason = RequestStatus.FINISHED, "length"
        self._retire(request)
        return [RequestDelta(request.request_id, request.parent_id, request.index, [], "", finish_reason="length",
                             num_prompt_tokens=len(request.prompt_token_ids),
                             error="the KV cache cannot hold this request")]

    def _before_release(self, request: Request) -> None:
        """Hook run when a request finishes, while it still holds its blocks."""

    # --- introspection -------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Load and cache figures (load reports, metrics, tests); safe to call from another thread."""
        scheduler, pool, cache = self.scheduler, self.pool, self.cache
        total, free, evictable = pool.num_blocks, pool.num_free, cache.evictable_blocks
        return EngineStats(
            running_requests=scheduler.num_running, waiting_requests=scheduler.num_waiting,
            running_tokens=scheduler.running_tokens, waiting_tokens=scheduler.waiting_tokens,
            reserved_requests=scheduler.num_reserved, reserved_tokens=scheduler.reserved_tokens,
            reserved_blocks=scheduler.reserved_blocks,
            total_blocks=total, free_blocks=free, cached_blocks=cache.cached_blocks, evictable_blocks=evictable,
            kv_usage=(total - free - evictable) / max(1, total),
            free_kv_tokens=(free + evictable) * self.config.page_size,
            prefix_hit_rate=cache.hit_rate,
            prefix_tokens_matched=cache.tokens_matched, prefix_tokens_looked_up=cache.tokens_looked_up,
            preemptions=scheduler.num_preemptions,
        )

    def embed(self, prompts: Sequence[Sequence[int]], pooling: str = "last",
              normalize: bool = True) -> list[list[float]]:
        """Pooled final hidden states, one vector per prompt (`pooling.py`); between steps only."""
        from baton.services.engine.pooling import embed
        return embed(self, prompts, pooling, normalize)

    def validate_embed(self, prompts: Sequence[Sequence[int]], pooling: str = "last") -> None:
        """Refuse a bad embedding request (ValueError) before any of it runs."""
        from baton.services.engine.pooling import validate
        validate(self, prompts, pooling)

    def reset_prefix_cache(self) -> None:
        """Evict every cached prefix (no request may be using one)."""
        self.cache.reset()

    def check_idle_integrity(self) -> None:
        """Assert that an idle engine holds no block outside the prefix cache."""
        assert not self.scheduler.has_work(), "engine is not idle"
        self.pool.check_integrity()
        self.cache.check_integrity()
        assert self.cache.locked_blocks == 0, "an idle engine holds radix locks"
        assert self.pool.num_free + self.cache.cached_blocks == self.pool.num_blocks, "blocks leaked"


def _advance(items: list[ScheduledItem]) -> None:
    """The step's tokens are computed: count them, and keep the prompt logprobs the runner computed."""
    for item in items:
        item.request.num_computed_tokens += item.num_tokens
        if item.prompt_logprobs:
            item.request.prompt_logprobs.extend(item.prompt_logprobs)


_EMPTY_ROW = ("no token can be sampled: the structured-output constraint allows none here (an unsatisfiable or "
              "self-recursive schema or grammar?), or bans leave none (min_tokens bans EOS and stop tokens)")


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace
    return replace(params, seed=seed)


"""Turning a batch of logits into one token per row: `Sampler`, `SamplingRow`, `SampledToken`.

Owns the per-step sampling pipeline, in this order (all vectorized over the batch, no Python
loops over the vocabulary, same code on CPU and CUDA):

1. cast to float32; log-probabilities are taken from these RAW logits (vLLM v1's default);
2. `process_logits`: repetition penalty (HF: over prompt + output tokens, positive logits
   divided, negative multiplied), frequency / presence penalties (OpenAI: over output tokens
   only), banned tokens set to -inf;
3. the caller's `mask_fn` (a grammar mask, applied in place);
4. greedy rows take the argmax; the other rows get temperature, then `filter_logits`
   (top-k, top-p, min-p, HF / vLLM semantics), then inverse-CDF sampling.

Randomness: each non-greedy row consumes exactly one uniform number per step, drawn from the
row's own `torch.Generator` when it has one (so a seeded request samples the same tokens
whatever else shares the batch), else from torch's default CPU generator.

`sample` returns host-side tokens (it waits for the device); `sample_device` returns the token
ids as a device tensor without any host synchronization (small host-built tensors go up
through pinned memory), for overlap scheduling; it takes no penalties, masks or logprobs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.host_copy import to_device_async

MaskFn = Callable[[torch.Tensor], None]


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of the logits batch."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: Optional[torch.Generator]
    """The request's own generator (see `make_generator`), or None for the default RNG."""
    banned_token_ids: tuple[int, ...] = ()
    """Tokens that must not be sampled this step (set by the engine, e.g. EOS before min_tokens)."""


@dataclass
class SampledToken:
    """The token chosen for one row, with its log-probabilities when asked for."""

    token_id: int
    logprob: Optional[float]
    """Log-probability of `token_id` under the raw logits; set when params.logprobs is not None."""
    top_logprobs: Optional[list[tuple[int, float]]]
    """The params.logprobs most likely (token_id, logprob) pairs of the raw logits, best first."""
    empty: bool = False
    """True when the row had no token left (every one banned or masked; `sample(mark_empty_rows=True)`):
    `token_id` means nothing and the request cannot go on."""


def make_generator(params: SamplingParams) -> Optional[torch.Generator]:
    """A CPU generator seeded from params.seed, or None when the request has no seed."""
    if params.seed is None:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(params.seed)
    return generator


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list (or CPU tensor) on `device`; to CUDA through pinned memory, never blocking the host."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return to_device_async(tensor.to(dtype), device)
    return tensor.to(device=device, dtype=dtype)


def _token_counts(id_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32 counts of each token id per row; ids outside [0, V) are ignored."""
    width = max((len(ids) for ids in id_lists), default=0)
    counts = torch.zeros(len(id_lists), vocab_size + 1, dtype=torch.float32, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    padded = [list(ids) + [vocab_size] * (width - len(ids)) for ids in id_lists]
    index = torch.tensor(padded, dtype=torch.long, device=device)
    index = torch.where((index < 0) | (index > vocab_size), vocab_size, index)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalties and bans: a new float32 [B, V] tensor (`logits` is left untouched).

    Repetition penalty p over tokens seen in prompt + output: logit / p when positive, logit * p
    otherwise. Then logit -= frequency_penalty * count_in_output + presence_penalty * (count > 0).
    Then every banned token becomes -inf.
    """
    out = logits.to(torch.float32, copy=True)
    vocab_size = out.shape[-1]
    device = out.device
    repetition = [row.params.repetition_penalty for row in rows]
    if any(p != 1.0 for p in repetition):
        seen_ids = [
            list(row.prompt_token_ids) + list(row.output_token_ids) if p != 1.0 else []
            for row, p in zip(rows, repetition)
        ]
        seen = _token_counts(seen_ids, vocab_size, device) > 0
        penalty = torch.tensor(repetition, dtype=torch.float32, device=device).unsqueeze(1)
        penalized = torch.where(out > 0, out / penalty, out * penalty)
        out = torch.where(seen, penalized, out)
    frequency = [row.params.frequency_penalty for row in rows]
    presence = [row.params.presence_penalty for row in rows]
    if any(f != 0.0 for f in frequency) or any(p != 0.0 for p in presence):
        output_ids = [
            row.output_token_ids if (f != 0.0 or p != 0.0) else ()
            for row, f, p in zip(rows, frequency, presence)
        ]
        counts = _token_counts(output_ids, vocab_size, device)
        freq = torch.tensor(frequency, dtype=torch.float32, device=device).unsqueeze(1)
        pres = torch.tensor(presence, dtype=torch.float32, device=device).unsqueeze(1)
        out = out - (freq * counts + pres * (counts > 0).to(torch.float32))
    if any(row.banned_token_ids for row in rows):
        banned = _token_counts([row.banned_token_ids for row in rows], vocab_size, device) > 0
        out = out.masked_fill(banned, float("-inf"))
    return out


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Top-k, then top-p, then min-p: a new [B, V] tensor with removed tokens set to -inf.

    `top_k` is [B] int64 in [1, V] (V keeps all); `top_p` and `min_p` are [B] float32.
    top-k keeps tokens whose logit is at least the k-th largest (ties at the k-th are kept,
    as in HF / vLLM). top-p keeps, from the best down, each token whose preceding tokens' total
    probability (renormalized after top-k) is still below top_p: the smallest set reaching
    top_p. min-p drops tokens whose probability is below min_p times the best token's. The best
    token is always kept.
    """
    neg_inf = float("-inf")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    kth_best = sorted_logits.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))
    remove = sorted_logits < kth_best
    probs = sorted_logits.masked_fill(remove, neg_inf).softmax(dim=-1)
    preceding = probs.cumsum(dim=-1) - probs
    top_p_col = top_p.unsqueeze(1)
    remove |= (preceding >= top_p_col) & (top_p_col < 1.0)
    remove |= probs < min_p.unsqueeze(1) * probs[:, :1]
    remove[:, 0] = False
    remove_in_vocab_order = torch.empty_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(remove_in_vocab_order, neg_inf)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: [B] int64 token ids, one per row of `probs` [B, V].

    `uniforms` is [B] in [0, 1). A token with probability zero is never returned (as long as
    the row has a positive entry): the chosen index is the first whose CDF exceeds u * total,
    clamped to the last positive entry against rounding.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    target = uniforms.to(device=probs.device, dtype=torch.float64) * cdf[:, -1]
    chosen = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_positive = torch.where(probs > 0, positions, -1).amax(dim=-1)
    return torch.minimum(chosen, last_positive)


def _changes_logits(row: SamplingRow) -> bool:
    """True when `process_logits` would change this row (a penalty or a ban applies)."""
    p = row.params
    return bool(row.banned_token_ids) or p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 \
        or p.presence_penalty != 0.0


class Sampler:
    """Stateless: all per-request state (generators, token history) comes in through the rows."""

    def sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        mask_fn: Optional[MaskFn] = None,
        mark_empty_rows: bool = False,
    ) -> list[SampledToken]:
        """One token per row of `logits` [B, V] (any float dtype, CPU or CUDA).

        A row with no token left (all banned or masked) raises ValueError, or with
        `mark_empty_rows` comes back `empty` while the other rows sample normally (one
        request's impossible constraint must not fail its batch).
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), V]; got {tuple(logits.shape)} for {len(rows)} rows")
        raw = logits.to(torch.float32)
        plain = mask_fn is None and not any(_changes_logits(row) for row in rows)
        processed = raw if plain else process_logits(raw, rows)  # plain: read only, no copy
        if mask_fn is not None:
            mask_fn(processed)
        tokens = self._choose(processed, rows)
        token_list = tokens.tolist()
        empty: set[int] = set()
        if not plain:  # only bans and masks can leave a row without a token
            for i, ok in enumerate((processed.amax(dim=-1) > float("-inf")).tolist()):
                if not ok:
                    if not mark_empty_rows:
                        raise ValueError(f"row {i}: every token is banned or masked; nothing can be sampled")
                    empty.add(i)
        if empty:  # an empty row's "token" may be -1; keep the logprob gather in range
            tokens = tokens.clamp(min=0)
            token_list = tokens.tolist()
        logprobs = self._logprobs(raw, rows, tokens)
        return [
            SampledToken(token_id=token, logprob=lp[0], top_logprobs=lp[1], empty=i in empty)
            for i, (token, lp) in enumerate(zip(token_list, logprobs))
        ]

    def sample_device(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """[B] int64 token ids on logits' device, the same as `sample` would choose, without waiting
        for the device. Rows may carry bans (`banned_token_ids`) but no penalties or logprobs."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows), V]; got {tuple(logits.shape)} for {len(rows)} rows")
        raw = logits.to(torch.float32)
        vocab_size = raw.shape[-1]
        ban_rows, ban_ids = [], []
        for i, row in enumerate(rows):
            for t in row.banned_token_ids:
                if 0 <= t < vocab_size:
                    ban_rows.append(i)
                    ban_ids.append(t)
        if ban_rows:
            index = to_device(ban_rows + ban_ids, torch.long, raw.device)
            n = len(ban_rows)
            raw = raw.index_put((index[:n], index[n:]), raw.new_full((n,), float("-inf")))
        return self._choose(raw, rows)

    def _choose(self, processed: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Greedy rows: argmax; the others: `_sample_rows`. [B] int64 on the logits' device."""
        if processed.is_cuda:  # two short Triton launches instead of one long torch reduction
            from baton.services.engine.sampling.gpu_argmax import argmax_rows
            tokens = argmax_rows(processed)
        else:
            tokens = processed.argmax(dim=-1)
        sampled_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled_rows:
            index = to_device(sampled_rows, torch.long, processed.device)
            tokens[index] = self._sample_rows(processed[index], [rows[i] for i in sampled_rows])
        return tokens

    def _sample_rows(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k / top-p / min-p and a random draw for the non-greedy rows."""
        device = logits.device
        vocab_size = logits.shape[-1]
        temperature = to_device([r.params.temperature for r in rows], torch.float32, device)
        logits = logits / temperature.unsqueeze(1)
        top_k = [r.params.top_k if 0 < r.params.top_k < vocab_size else vocab_size for r in rows]
        top_p = [r.params.top_p for r in rows]
        min_p = [r.params.min_p for r in rows]
        if any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p) or any(p > 0.0 for p in min_p):
            logits = filter_logits(
                logits,
                to_device(top_k, torch.long, device),
                to_device(top_p, torch.float32, device),
                to_device(min_p, torch.float32, device),
            )
        return sample_from_probs(logits.softmax(dim=-1), to_device(self._uniforms(rows), torch.float64, device))

    @staticmethod
    def _uniforms(rows: list[SamplingRow]) -> torch.Tensor:
        """One uniform in [0, 1) per row (CPU float64): own generator if any, else default RNG."""
        uniforms = torch.empty(len(rows), dtype=torch.float64)
        unseeded = [i for i, row in enumerate(rows) if row.generator is None]
        if unseeded:
            uniforms[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
        for i, row in enumerate(rows):
            if row.generator is not None:
                draw = torch.rand(1, generator=row.generator, dtype=torch.float64, device=row.generator.device)
                uniforms[i] = draw.cpu()[0]
        return uniforms

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor
    ) -> list[tuple[Optional[float], Optional[list[tuple[int, float]]]]]:
        """(logprob of the sampled token, top alternatives) per row, from the raw logits."""
        result: list[tuple[Optional[float], Optional[list[tuple[int, float]]]]] = [(None, None)] * len(rows)
        wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if not wanted:
            return result
        index = torch.tensor(wanted, dtype=torch.long, device=raw.device)
        entries = gather_logprobs(torch.log_softmax(raw[index], dim=-1), tokens[index],
                                  [rows[i].params.logprobs or 0 for i in wanted])
        for i, entry in zip(wanted, entries):
            result[i] = entry
        return result


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    counts: Sequence[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of a [rows, V] log-softmax: (the logprob of token_ids[row], its counts[row] most
    likely (token_id, logprob) alternatives, best first)."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    most = min(max(counts, default=0), logprobs.shape[-1])
    top_values: list[list[float]] = [[] for _ in chosen]
    top_ids: list[list[int]] = [[] for _ in chosen]
    if most > 0:
        values, ids = logprobs.topk(most, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return [(chosen[j], list(zip(top_ids[j][:count], top_values[j][:count]))) for j, count in enumerate(counts)]

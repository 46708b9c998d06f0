"""Sampler: penalties, filtering, greedy / random sampling, seeding, logprobs, bans and masks."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import pytest
import torch

from baton.services.engine.sampling.sampler import (
    SamplingRow,
    Sampler,
    filter_logits,
    make_generator,
    process_logits,
    sample_from_probs,
)
from baton.services.engine.sampling_params import SamplingParams

NEG_INF = float("-inf")


def row(
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    banned: tuple[int, ...] = (),
    generator: Optional[torch.Generator] = None,
) -> SamplingRow:
    return SamplingRow(params, prompt, output, generator, banned)


def counts_of(logits: torch.Tensor, params: SamplingParams, draws: int, seed: int = 0, **kw) -> torch.Tensor:
    """Sample `draws` tokens from one row repeated in a batch (default RNG, seeded locally)."""
    batch = logits.unsqueeze(0).expand(draws, -1)
    rows = [row(params, **kw) for _ in range(draws)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokens = [t.token_id for t in Sampler().sample(batch, rows)]
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1])


def test_greedy_is_argmax_in_any_dtype() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, -2.0, 4.0, 0.0]], dtype=torch.bfloat16)
    params = SamplingParams(temperature=0.0)
    tokens = Sampler().sample(logits, [row(params), row(SamplingParams(top_k=1, temperature=0.7))])
    assert [t.token_id for t in tokens] == [1, 0]
    assert tokens[0].logprob is None and tokens[0].top_logprobs is None


def test_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[1.0, 2.0, 50.0, 3.0]])
    token = Sampler().sample(logits, [row(SamplingParams(temperature=1e-30))])[0]
    assert token.token_id == 2


def test_repetition_penalty_exact() -> None:
    logits = torch.tensor([[2.0, -2.0, 4.0, -1.0, 1.0]])
    r = row(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[1, 3, 3])
    out = process_logits(logits, [r])
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 4.0, -2.0, 1.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 4.0, -1.0, 1.0]]))  # input untouched


def test_frequency_and_presence_penalties_exact_over_output_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(logits, [row(params, prompt=[0, 0, 0], output=[1, 2, 2, 2])])
    # token 0: prompt only -> untouched; 1: once -> 1 - 0.5 - 0.25; 2: three times -> 1 - 1.5 - 0.25
    assert torch.allclose(out, torch.tensor([[1.0, 0.25, -0.75, 1.0]]))


def test_penalties_are_per_row_and_combine() -> None:
    logits = torch.tensor([[3.0, -3.0, 0.5], [3.0, -3.0, 0.5]])
    rows = [
        row(SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0), prompt=[1], output=[0, 0]),
        row(SamplingParams(), prompt=[1], output=[0, 0], banned=(2,)),
    ]
    out = process_logits(logits, rows)
    assert torch.allclose(out[0], torch.tensor([3.0 / 1.5 - 2.0, -4.5, 0.5]))
    assert torch.equal(out[1], torch.tensor([3.0, -3.0, NEG_INF]))


def test_out_of_range_ids_are_ignored() -> None:
    logits = torch.zeros(1, 3)
    out = process_logits(logits, [row(SamplingParams(presence_penalty=1.0), output=[7, -1, 2])])
    assert torch.equal(out, torch.tensor([[0.0, 0.0, -1.0]]))


def test_filter_logits_support_sets_by_hand() -> None:
    # probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = probs.log().unsqueeze(0).repeat(4, 1)
    top_k = torch.tensor([2, 5, 5, 5])
    top_p = torch.tensor([1.0, 0.7, 0.85, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2])
    kept = torch.isfinite(filter_logits(logits, top_k, top_p, min_p))
    assert kept[0].tolist() == [True, True, False, False, False]  # top_k=2
    assert kept[1].tolist() == [True, True, False, False, False]  # 0.5 < 0.7 <= 0.75
    assert kept[2].tolist() == [True, True, True, False, False]  # 0.75 < 0.85 <= 0.875
    assert kept[3].tolist() == [True, True, True, False, False]  # p >= 0.2 * 0.5 = 0.1


def test_top_p_is_applied_after_top_k_renormalization() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().unsqueeze(0)
    # after top_k=2 the probabilities are 4/7, 3/7: top_p=0.5 keeps only the best
    kept = torch.isfinite(filter_logits(logits, torch.tensor([2]), torch.tensor([0.5]), torch.tensor([0.0])))
    assert kept[0].tolist() == [True, False, False, False]


def test_top_k_support_is_exactly_k() -> None:
    logits = torch.tensor([0.3, 2.0, 1.0, -0.5, 1.5, 0.0])
    counts = counts_of(logits, SamplingParams(top_k=3), draws=3000)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 2, 4}


def test_top_p_and_min_p_support_when_sampling() -> None:
    logits = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]).log()
    counts = counts_of(logits, SamplingParams(top_p=0.85), draws=3000)
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 1, 2}
    counts = counts_of(logits, SamplingParams(min_p=0.3), draws=3000)
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 1}


def test_temperature_matches_softmax_of_scaled_logits() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    draws = 20000
    for temperature in (0.5, 2.0):
        counts = counts_of(logits, SamplingParams(temperature=temperature), draws=draws, seed=int(temperature * 10))
        expected = torch.softmax(logits / temperature, dim=-1) * draws
        chi_square = float(((counts - expected) ** 2 / expected).sum())
        assert chi_square < 20.0, (temperature, counts, expected)  # 3 dof: p ~ 2e-4
    # and the two temperatures really differ: T=0.5 is sharper than T=2
    sharp = counts_of(logits, SamplingParams(temperature=0.5), draws=2000, seed=1)
    flat = counts_of(logits, SamplingParams(temperature=2.0), draws=2000, seed=1)
    assert sharp[0] > flat[0] and sharp[2] < flat[2]


def test_seeded_rows_reproduce_regardless_of_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.3, seed=1234)

    def run(batch_logits: torch.Tensor, position: int, steps: int = 20) -> list[int]:
        generator = make_generator(params)
        # neighbours with their own filters and penalties must not change this row's draws
        others = [
            row(SamplingParams(temperature=0.9, top_k=5, presence_penalty=1.0), output=[3])
            for _ in range(batch_logits.shape[0])
        ]
        tokens = []
        for _ in range(steps):
            rows = list(others)
            rows[position] = row(params, generator=generator)
            tokens.append(Sampler().sample(batch_logits, rows)[position].token_id)
        return tokens

    alone = run(logits[1:2], 0)
    assert alone == run(logits[1:2], 0)
    batch = logits.clone()
    assert run(batch, 1) == alone
    shuffled = torch.stack([logits[2], logits[0], logits[1]])
    assert run(shuffled, 2) == alone
    assert len(set(alone)) > 1  # it really samples


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    rows = [
        row(SamplingParams(temperature=0.5, logprobs=2, repetition_penalty=3.0), prompt=[0], banned=(1,)),
        row(SamplingParams(temperature=0.0, logprobs=0)),
    ]
    tokens = Sampler().sample(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    first, second = tokens
    assert first.token_id != 1
    assert first.logprob == pytest.approx(float(expected[0, first.token_id]), abs=1e-6)
    assert [t for t, _ in first.top_logprobs] == [0, 1]
    assert [lp for _, lp in first.top_logprobs] == pytest.approx(expected[0, :2].tolist(), abs=1e-6)
    assert second.token_id == 2 and second.top_logprobs == []
    assert second.logprob == pytest.approx(float(expected[1, 2]), abs=1e-6)


def test_banned_tokens_never_sampled() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, 0.0])
    counts = counts_of(logits, SamplingParams(temperature=1.0), draws=500, banned=(0, 1))
    assert counts[0] == 0 and counts[1] == 0 and counts.sum() == 500
    greedy = Sampler().sample(logits.unsqueeze(0), [row(SamplingParams(temperature=0.0), banned=(0,))])
    assert greedy[0].token_id == 1


def test_mask_fn_is_respected() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 200)
    allowed = torch.tensor([False, False, True, True])

    def mask(processed: torch.Tensor) -> None:
        processed.masked_fill_(~allowed, NEG_INF)

    rows = [row(SamplingParams(temperature=0.0 if i == 0 else 2.0)) for i in range(200)]
    tokens = [t.token_id for t in Sampler().sample(logits, rows, mask_fn=mask)]
    assert tokens[0] == 2 and set(tokens) <= {2, 3} and 3 in tokens


def test_all_tokens_masked_raises() -> None:
    with pytest.raises(ValueError, match="row 0"):
        Sampler().sample(torch.zeros(1, 3), [row(SamplingParams(), banned=(0, 1, 2))])


def test_sample_from_probs_never_picks_zero_probability() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    uniforms = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0 - 1e-16], dtype=torch.float64)
    assert sample_from_probs(probs, uniforms).tolist() == [1, 1, 3, 3, 3]


def test_make_generator() -> None:
    assert make_generator(SamplingParams()) is None
    a, b = make_generator(SamplingParams(seed=7)), make_generator(SamplingParams(seed=7))
    assert a is not None and b is not None
    assert math.isclose(float(torch.rand(1, generator=a)), float(torch.rand(1, generator=b)))

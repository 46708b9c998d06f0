"""The small-batch Triton GEMV against a float64 reference, with and without its fused SiLU.

Fresh random x and W per case (odd sizes included, so the masked tails run), the output
filled with NaN first so an unwritten element fails; relative error ||y - ref|| / ||ref||
under 1e-2 in bf16 / fp16.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from baton.services.engine.models.gemv import AUTO_GEMV_ROWS, PRO_SILU_MUL, gemv, use_gemv  # noqa: E402

CASES = [(m, n, k) for m in (1, 2, 3, 4) for n, k in ((64, 512), (100, 384), (4096, 4096), (6144, 4096),
                                                      (33, 1000))]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize("prologue", [0, PRO_SILU_MUL])
def test_gemv_matches_float64(m: int, n: int, k: int, prologue: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k + prologue)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype).cuda()
    x = torch.randn(m, 2 * k if prologue else k, generator=gen).to(dtype).cuda()
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    gemv(x, w, prologue, out=out)
    if prologue:
        xd = x.double()
        gate, up = xd[:, :k], xd[:, k:]
        xin = gate * torch.sigmoid(gate) * up
    else:
        xin = x.double()
    ref = xin @ w.double().t()
    assert not out.isnan().any()
    assert _rel(out, ref) < 1e-2


def test_gemv_config_sweep_all_agree() -> None:
    """Every tile config the benchmark tries gives the same result (masked tails, EVEN paths)."""
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(300, 1536, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    x = torch.randn(3, 1536, generator=gen).to(torch.bfloat16).cuda()
    ref = x.double() @ w.double().t()
    for cfg in [(bn, bk, nw, st) for bn in (4, 8, 16) for bk in (256, 512) for nw in (4, 8) for st in (1, 3)]:
        assert _rel(gemv(x, w, config=cfg), ref) < 1e-2, cfg


def test_use_gemv_only_for_small_half_batches() -> None:
    w = torch.zeros(8, 16, dtype=torch.bfloat16, device="cuda")
    assert use_gemv(torch.zeros(1, 16, dtype=torch.bfloat16, device="cuda"), w)
    assert use_gemv(torch.zeros(AUTO_GEMV_ROWS, 16, dtype=torch.bfloat16, device="cuda"), w)
    assert not use_gemv(torch.zeros(AUTO_GEMV_ROWS + 1, 16, dtype=torch.bfloat16, device="cuda"), w)
    assert not use_gemv(torch.zeros(1, 16, device="cuda"), w.float())
    assert not use_gemv(torch.zeros(1, 16, dtype=torch.bfloat16), w.cpu())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_bf16_decode_steps_through_gemv_close_to_transformers(family: str, graphs: bool, tmp_path) -> None:
    """Decode steps of 1 sequence (the GEMV path, bias included for qwen2) and of 3 (cuBLAS)
    give logits within bf16 tolerance of transformers' on the same weights, and of the
    all-cuBLAS path's."""
    import random

    import transformers

    from baton.services.engine import LLM
    from baton.services.engine.models import gemv as gemv_module
    from baton.services.engine.request import Request
    from baton.services.engine.sampling_params import SamplingParams
    from baton.services.engine.scheduling.scheduler import ScheduledItem
    from tests.helpers.tiny_models import VOCAB, make_tiny_model

    folder = make_tiny_model(family, tmp_path / family)
    llm = LLM(model=str(folder), device="cuda", dtype="bfloat16", kv_cache_tokens=4096, page_size=16,
              disable_cuda_graph=not graphs, cuda_graph_max_bs=4, disable_overlap_schedule=True)
    runner = llm.engine.runner
    assert runner.use_graphs == graphs
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (9, 20, 33)]
    free = iter(range(llm.engine.pool.num_blocks))
    requests = []
    for i, prompt in enumerate(prompts):
        req = Request(request_id=f"r{i}", parent_id=f"r{i}", index=0, prompt_token_ids=list(prompt),
                      params=SamplingParams(max_tokens=1), arrival=i)
        req.block_table = [next(free) for _ in range((len(prompt) + 15) // 16)]
        requests.append(req)
    runner.execute([ScheduledItem(r, 0, len(p) - 1) for r, p in zip(requests, prompts)])  # prefill all but one
    with torch.no_grad():
        want = torch.stack([hf(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts])
    for batch in (requests[:1], requests):
        decode = [ScheduledItem(r, len(r.prompt_token_ids) - 1, 1) for r in batch]
        got = runner.execute(decode).float()
        saved = gemv_module.AUTO_GEMV_ROWS
        gemv_module.AUTO_GEMV_ROWS = 0  # the same step through cuBLAS
        try:
            use, runner.use_graphs = runner.use_graphs, False
            cublas = runner.execute(decode).float()
        finally:
            gemv_module.AUTO_GEMV_ROWS, runner.use_graphs = saved, use
        for row in range(len(batch)):
            err = float((got[row] - want[row]).norm() / want[row].norm())
            err_cublas = float((got[row] - cublas[row]).norm() / cublas[row].norm())
            print(f"{family} batch {len(batch)} row {row}: vs transformers {err:.2e}, vs cuBLAS {err_cublas:.2e}")
            assert err < 3e-2 and err_cublas < 3e-2


def test_startup_tuning_marks_every_projection(tmp_path) -> None:
    """A bf16 engine on CUDA measured each projection kind at start: every projection carries
    the choice (a candidate Triton config or None for cuBLAS), the same within a kind, and
    greedy decoding through those choices still runs and stays in the vocabulary."""
    from baton.services.engine import LLM, SamplingParams
    from baton.services.engine.models.gemv_tuning import CANDIDATES
    from tests.helpers.tiny_models import VOCAB, make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "llama")
    llm = LLM(model=str(folder), device="cuda", dtype="bfloat16", kv_cache_tokens=4096, cuda_graph_max_bs=4)
    model = llm.engine.runner.model
    assert set(model.gemv_choices) == {"qkv", "o", "gate_up", "down", "lm_head"}
    for choice in model.gemv_choices.values():
        assert choice is None or (choice[0], choice[2], choice[3]) in {(c[0], c[2], c[3]) for c in CANDIDATES}
    for layer in model.model.layers:
        assert layer.self_attn.qkv_proj.gemv_config == model.gemv_choices["qkv"]
        assert layer.mlp.down_proj.gemv_config == model.gemv_choices["down"]
    assert model.lm_head.gemv_config == model.gemv_choices["lm_head"]
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8 and all(0 <= t < VOCAB for t in out[0].outputs[0].token_ids)

"""bench/mixed_step_profile.py on CPU with a tiny model: each step it would profile holds exactly the mix
asked for (decode rows beside whole prefill chunks), and the linear FLOP count follows the config."""
from baton.bench.mixed_step_profile import Mix, linear_flops, run
from baton.services.engine import LLM
from tests.helpers.tiny_models import make_tiny_model


def test_each_profiled_step_holds_the_mix_asked_for(tmp_path):
    llm = LLM(model=str(make_tiny_model("llama", tmp_path / "m")), page_size=4, kv_cache_tokens=8192, num_threads=1,
              chunked_prefill_size=256, max_num_batched_tokens=512)
    mixes = (Mix(0, (200,)), Mix(3, (64, 32)), Mix(8, (16,) * 4))
    rows = run(llm.engine, mixes=mixes, reps=2, profile=False)
    assert [(r["seen"], r["seen_decodes"]) for r in rows] == [([200], 0), ([32, 64], 3), ([16] * 4, 8)]
    assert all(r["matches"] for r in rows)
    assert not llm.engine.has_unfinished()  # every request it started was aborted


def test_linear_flops_count_every_projection_and_the_sampled_rows():
    class Cfg:
        num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size = 2, 8, 2, 1, 4, 16, 10
    per_token = 2 * 2 * 8 * ((2 + 2) * 4 + 2 * 4 + 3 * 16)
    assert linear_flops(Cfg, tokens=5, sampled_rows=3) == 5 * per_token + 3 * 2 * 8 * 10

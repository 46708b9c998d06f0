"""bench/lang.py's pieces that need no cluster: the inputs, the branch prompts the baseline
sends (the very text the program's branches send), and the report's figures."""
from baton.bench.lang import FEW_SHOT, QUESTIONS, Side, branch_prompt, inputs, report


def test_inputs_are_distinct_and_prompts_share_the_few_shot_prefix():
    items = inputs(45)
    assert len(set(items)) == 45
    prompts = [branch_prompt(items[0], q) for q in QUESTIONS]
    assert all(p.startswith(FEW_SHOT + "Item: apple\n") for p in prompts) and prompts[0].endswith("Category:")


def test_report_states_the_ratio_and_the_cached_share():
    lang = Side("lang", 10.0, 200, 800, 4000, 100000, 80000, 80000, 100000)
    base = Side("base", 40.0, 200, 800, 4000, 100000, 0, 0, 100000)
    text = report(lang, base, 790, 800, "python3 -m baton.bench.lang", "2 cores", ["--kv-cache-tokens", "1"])
    assert "**4.00x**" in text and "790/800" in text
    assert "| lang | 10.0 | 20.00 | 80.00 | 400.0 | 80.0% | 80000 / 100000 |" in text
    assert "| base | 40.0 | 5.00 | 20.00 | 100.0 | 0.0% |" in text

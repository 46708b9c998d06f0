"""bench/lang.py's two sides against a real `baton up`: the program's branches and the
independent requests send the same prompts and get the same greedy answers; the program's
branches find the shared prefix cached."""
from baton.bench.lang import QUESTIONS, inputs, run_lang, run_openai


def test_both_sides_answer_alike_and_the_program_reuses_its_prefix(baton_up):
    items = inputs(3)
    lang, lang_answers = run_lang(baton_up, items, threads=3, max_tokens=6)
    base, base_answers = run_openai(baton_up, items, threads=3, max_tokens=6)
    assert lang_answers == base_answers and len(lang_answers[0]) == len(QUESTIONS)
    assert lang.requests == base.requests == 12 and lang.prompt_tokens == base.prompt_tokens
    assert lang.cached_share > 0.8 and lang.server_matched >= lang.cached_tokens

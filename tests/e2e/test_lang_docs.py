"""The examples of docs/lang.md (and the README's) run as written against a real `baton up`
(only the address changes) and do what the page says: the extraction matches its regex, the multi-hop program's
branches reuse the shared prefix, the select picks one of its labels with a score for each,
and `run_batch` serves 64 programs."""
import re
from pathlib import Path

import pytest

import baton
from tests.helpers.workers import REPO

DOC = Path(REPO / "docs/lang.md").read_text()
DOC_URL = "http://localhost:8000"


def example(name: str) -> str:
    """The code block under `<!-- example: NAME -->`."""
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", DOC, re.S)
    assert match, f"docs/lang.md has no example {name!r}"
    return match.group(1)


@pytest.fixture
def run_example(baton_up, capsys):
    namespace: dict = {}

    def run(name: str) -> dict:
        code = example(name)
        assert DOC_URL in code or name == "run_batch"
        exec(compile(code.replace(DOC_URL, baton_up), f"docs/lang.md:{name}", "exec"), namespace)
        return namespace
    yield run
    baton.reset_default_backend()


def test_extraction_example(run_example, capsys):
    ns = run_example("extraction")
    output = ns["state"]["json_output"]
    assert re.fullmatch(r'\{\s*"name"\s*:\s*"[^"]*",\s*"age"\s*:\s*\d+\s*\}', output)
    assert capsys.readouterr().out.strip() == output


def test_multi_hop_example(run_example):
    ns = run_example("multi_hop")
    state = ns["state"]
    assert state["entity"] and state["answer"]
    assert state.get_meta_info("answer")["cached_tokens"] > 0  # the entity step's prompt was reused
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert "Facts: " in state.messages()[3]["content"] and " is famous for " not in state.messages()[1]["content"]


def test_select_and_run_batch_examples(run_example, capsys):
    ns = run_example("select")
    labels = ["positive", "negative", "neutral"]
    assert ns["state"]["label"] in labels and len(ns["state"].get_meta_info("label")["scores"]) == 3
    ns = run_example("run_batch")
    assert len(ns["labels"]) == 64 and set(ns["labels"]) <= set(labels)
    assert all(s.error() is None for s in ns["states"])
    assert "64/64" in capsys.readouterr().err  # the progress bar ran to the end


def test_readme_example(baton_up, capsys):
    readme = Path(REPO / "README.md").read_text()
    code = re.search(r"Programs against a running cluster.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "http://127.0.0.1:8000" in code
    try:
        exec(compile(code.replace("http://127.0.0.1:8000", baton_up), "README.md", "exec"), {})
    finally:
        baton.reset_default_backend()
    assert capsys.readouterr().out.strip() in ("positive", "negative")

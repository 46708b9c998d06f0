"""The language's constructors and programs refuse bad input where it is written, before any
backend is involved (the behaviour against a real cluster is in tests/e2e/test_lang.py)."""
from __future__ import annotations

import pytest

import baton
from baton.lang.ir import ExprList, Gen, Role, Select, Text, as_expr


def test_expressions_concatenate_flat():
    expr = "The answer is " + baton.gen("a") + "." + baton.select("b", choices=["x", "y"])
    assert isinstance(expr, ExprList)
    assert [type(e) for e in expr.items] == [Text, Gen, Text, Select]
    assert expr.describe() == "text 'The answer is ' + gen('a') + text '.' + select('b')"
    assert baton.user("hi") == Role("user", Text("hi"))
    assert baton.gen("c", choices=["p", "q"]) == Select("c", ("p", "q"))


@pytest.mark.parametrize("make, message", [
    (lambda: baton.gen("x", max_tokens=0), "max_tokens must be a positive int"),
    (lambda: baton.gen("x", temperature=-1), "temperature"),
    (lambda: baton.gen("x", top_p=0), "top_p"),
    (lambda: baton.gen("x", stop=["ok", ""]), "stop must be non-empty"),
    (lambda: baton.gen("x", regex="a", json_schema={"type": "string"}), "at most one of regex and json_schema"),
    (lambda: baton.gen("x", json_schema="{not json"), "json_schema must be a dict or JSON text"),
    (lambda: baton.gen(""), "variable name"),
    (lambda: baton.select("x", choices=[]), "non-empty list of choices"),
    (lambda: baton.select("x", choices="ab"), "non-empty list of choices"),
    (lambda: baton.select("x", choices=["a", ""]), "every choice"),
    (lambda: baton.image(b""), "the image is empty"),
    (lambda: baton.image(b"not an image"), "cannot tell the image type"),
])
def test_bad_arguments_are_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_images_and_other_values(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(8)
    assert baton.image(png).data_url.startswith("data:image/png;base64,")
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff" + bytes(8))
    assert baton.image(tmp_path / "a.jpg").mime == "image/jpeg"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        baton.image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="not int"):
        as_expr(42)


def test_programs_check_their_arguments_and_backend():
    baton.reset_default_backend()

    @baton.function
    def program(s, question, hint="none"):
        s += question

    with pytest.raises(TypeError, match="program: missing a required argument: 'question'"):
        program.run(backend=object())
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        program.run(question="q", nope=1, backend=object())
    with pytest.raises(RuntimeError, match="no backend: pass backend="):
        program.run(question="q")
    with pytest.raises(TypeError, match="list of argument dicts"):
        program.run_batch({"question": "q"})
    with pytest.raises(ValueError, match="num_threads"):
        program.run_batch([{"question": "q"}], num_threads=0, backend=object())
    with pytest.raises(TypeError, match="takes the state as its first argument"):
        baton.function(lambda: None)
    with pytest.raises(TypeError, match="is not a backend: it has no generate"):
        baton.set_default_backend(object())
    with pytest.raises(ValueError, match="base_url must be an http"):
        baton.RuntimeEndpoint("localhost:8000")

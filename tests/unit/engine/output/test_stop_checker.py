"""StopStringChecker: stops spanning deltas, several stops, include flag, held-back tails."""
from __future__ import annotations

from typing import Sequence

import pytest

from baton.services.engine.output.stop_checker import StopStringChecker


def run(checker: StopStringChecker, deltas: Sequence[str]) -> tuple[list[str], bool]:
    """Feed deltas until a stop; returns the emitted pieces (flush added when not stopped)."""
    emitted: list[str] = []
    for delta in deltas:
        text, stopped = checker.feed(delta)
        emitted.append(text)
        if stopped:
            return emitted, True
    emitted.append(checker.flush())
    return emitted, False


def test_no_stops_emits_everything_immediately() -> None:
    checker = StopStringChecker((), include_stop_str_in_output=False)
    assert checker.feed("Hello ") == ("Hello ", False)
    assert checker.feed("world") == ("world", False)
    assert checker.flush() == ""


def test_stop_in_a_single_delta_cuts_before_it() -> None:
    checker = StopStringChecker(["END"], include_stop_str_in_output=False)
    assert checker.feed("abc END def") == ("abc ", True)
    assert checker.stopped and checker.matched_stop == "END"
    assert checker.feed("more") == ("", True)


def test_stop_split_over_several_deltas() -> None:
    checker = StopStringChecker(["</answer>"], include_stop_str_in_output=False)
    emitted, stopped = run(checker, ["The answer is 42<", "/ans", "wer", ">trailing"])
    assert stopped
    assert emitted == ["The answer is 42", "", "", ""]
    assert "".join(emitted) == "The answer is 42"


def test_include_stop_string_in_output() -> None:
    checker = StopStringChecker(["</answer>"], include_stop_str_in_output=True)
    emitted, stopped = run(checker, ["The answer is 42<", "/ans", "wer>tra", "iling"])
    assert stopped
    assert "".join(emitted) == "The answer is 42</answer>"


def test_streamed_text_never_shows_part_of_a_stop() -> None:
    text = "alpha beta STOP gamma"
    for size in range(1, len(text) + 1):
        checker = StopStringChecker(["STOP"], include_stop_str_in_output=False)
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        emitted, stopped = run(checker, pieces)
        assert stopped and "".join(emitted) == "alpha beta "
        assert all("S" not in piece for piece in emitted)


def test_earliest_stop_wins_not_list_order() -> None:
    checker = StopStringChecker(["World", "lo"], include_stop_str_in_output=False)
    assert checker.feed("Hello World") == ("Hel", True)
    assert checker.matched_stop == "lo"
    checker = StopStringChecker(["ccc", "b"], include_stop_str_in_output=True)
    assert checker.feed("aaab ccc") == ("aaab", True)


def test_overlapping_stops_do_not_depend_on_delta_split() -> None:
    # "bc" completes before "abcd" does, whichever way the text arrives
    text = "xxabcdyy"
    results = set()
    for size in range(1, len(text) + 1):
        checker = StopStringChecker(["abcd", "bc"], include_stop_str_in_output=False)
        emitted, stopped = run(checker, [text[i : i + size] for i in range(0, len(text), size)])
        assert stopped
        results.add(("".join(emitted), checker.matched_stop))
    assert results == {("xxa", "bc")}
    # same end: the longer (earlier-starting) stop wins
    checker = StopStringChecker(["bc", "abc"], include_stop_str_in_output=False)
    assert checker.feed("xxabc") == ("xx", True) and checker.matched_stop == "abc"


def test_held_back_tail_is_released_when_ruled_out() -> None:
    checker = StopStringChecker(["STOP"], include_stop_str_in_output=False)
    assert checker.feed("go ST") == ("go ", False)
    assert checker.pending == "ST"
    assert checker.feed("ART now") == ("START now", False)
    assert checker.pending == ""


def test_held_back_tail_is_flushed_at_end() -> None:
    checker = StopStringChecker(["STOP", "\n\nUser:"], include_stop_str_in_output=False)
    emitted, stopped = run(checker, ["done.", "\n", "\nUs"])
    assert not stopped
    assert emitted == ["done.", "", "", "\n\nUs"]
    assert checker.flush() == ""


def test_no_false_holds() -> None:
    checker = StopStringChecker(["STOP", "###"], include_stop_str_in_output=False)
    for delta in ["plain text", " with T and O", " and #x", " ends in P"]:
        assert checker.feed(delta) == (delta, False)
    assert checker.pending == ""


def test_repeated_prefix_keeps_only_what_can_still_match() -> None:
    checker = StopStringChecker(["abcabd"], include_stop_str_in_output=False)
    assert checker.feed("xabcab") == ("x", False)
    assert checker.feed("c") == ("abc", False)  # "abc" could still start "abcabd"
    assert checker.feed("abd") == ("", True)


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError):
        StopStringChecker(["ok", ""], include_stop_str_in_output=False)

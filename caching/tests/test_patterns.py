from __future__ import annotations

import time

import pytest

from caching.patterns import PatternError, pattern_compile


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("topic:python*", "topic:python programming:subtopics:ab12", True),
        ("TOPIC:Python*", "topic:python programming:subtopics:ab12", True),
        ("topic:*:subtopics:*", "topic:rust:subtopics:ab12", True),
        ("topic:*:subtopics:*", "topic:rust:explanations:ab12", False),
        ("topic:caf?:*", "topic:café:subtopics:ab12", True),  # ? is one character
        ("topic:[^p]*", "topic:rust:subtopics:ab12", True),
        ("topic:[!p]*", "topic:python:subtopics:ab12", False),
        ("topic:[p-r]*", "topic:rust:subtopics:ab12", True),
        ("topic:[-x]*", "topic:-:subtopics:ab12", True),
        ("topic:a\\*b:*", "topic:a*b:subtopics:ab12", True),
        ("topic:a\\*b:*", "topic:axb:subtopics:ab12", False),
        ("gen:*", "topic:gen:x", False),
    ],
)
def test_pattern_matches_keys_as_documented(pattern, key, matches):
    assert pattern_compile(pattern).matches(key) is matches


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("[", "never closed"),
        ("topic:[ab", "never closed"),
        ("topic:[a\\", "never closed"),
        ("topic:\\", "lone \\"),
        ("topic:[]", "empty"),
        ("topic:[^]", "empty"),
        ("topic:[z-a]", "backwards"),
    ],
)
def test_malformed_pattern_is_refused_saying_why(pattern, says):
    with pytest.raises(PatternError) as refused:
        pattern_compile(pattern)

    assert says in str(refused.value)


def test_literal_start_narrows_the_scan_in_any_case():
    assert pattern_compile("Topic:Py*").namespace == "topic"
    assert pattern_compile("Topic:Py*").scan_prefix == "[pP][yY]"
    assert pattern_compile("*:py*").namespace is None
    assert pattern_compile("topic:café*").scan_prefix == "[cC][aA][fF]"  # Redis compares bytes


def test_many_stars_do_not_make_matching_backtrack_for_ever():
    pattern = pattern_compile("*a" * 60 + "*b")
    started = time.monotonic()

    assert pattern.matches("a" * 500) is False
    assert time.monotonic() - started < 1

from __future__ import annotations

from generation.topics import subtopics_parse, topic_graph


def test_subtopics_parse_reads_plain_json():
    assert subtopics_parse('{"subtopics": ["a", "b", "c"]}', count=6) == ["a", "b", "c"]


def test_subtopics_parse_repairs_fenced_json_with_trailing_comma():
    text = 'Sure! Here they are:\n```json\n{"subtopics": ["Syntax", "Types",]}\n```'
    assert subtopics_parse(text, count=6) == ["Syntax", "Types"]


def test_subtopics_parse_accepts_bullets_when_no_json():
    text = "1. Syntax\n2. Types\n- Modules\n* syntax"
    assert subtopics_parse(text, count=6) == ["Syntax", "Types", "Modules"]


def test_subtopics_parse_cuts_at_count_and_reads_objects():
    text = '[{"name": "a"}, {"title": "b"}, {"label": "c"}]'
    assert subtopics_parse(text, count=2) == ["a", "b"]


def test_subtopics_parse_garbage_yields_nothing():
    assert subtopics_parse('{"subtopics": [ oops', count=6) == []


def test_subtopics_parse_drops_repeats_and_the_topic_itself_after_the_known_labels():
    text = '{"subtopics": ["Python", "syntax", "Typing", "  PYTHON ", "Testing"]}'
    labels = subtopics_parse(text, count=4, topic="python", known=["Syntax"])
    assert labels == ["Syntax", "Typing", "Testing"]


def test_topic_graph_links_every_subtopic_to_the_root():
    graph = topic_graph(topic="Python", subtopics=["Syntax", "Types"])
    assert graph["nodes"][0] == {"id": "root", "label": "Python"}
    assert graph["edges"] == [
        {"source": "root", "target": "s1"},
        {"source": "root", "target": "s2"},
    ]


def test_subtopics_parse_keeps_the_complete_items_of_an_answer_cut_short():
    # An answer cut by max_tokens: the items before the cut are whole and usable.
    text = '```json\n{"subtopics": ["Alpha", "Beta", "Gam'
    assert subtopics_parse(text, count=6) == ["Alpha", "Beta"]
    objects = '[{"name": "Alpha", "why": "first"}, {"name": "Beta", "why": "sec'
    assert subtopics_parse(objects, count=6) == ["Alpha"]
    assert subtopics_parse('{"subtopics": ["Al', count=6) == []


def test_subtopics_parse_reads_single_quoted_lists_without_breaking_apostrophes():
    # Python-style answers: single quotes, an escaped apostrophe, or double quotes around
    # the items that hold one (Python's own repr of such a list).
    escaped = "{'subtopics': ['Newton\\'s laws', 'Energy', 'Momentum',]}"
    mixed = "[\"Newton's laws\", 'Energy', 'Momentum']"
    expected = ["Newton's laws", "Energy", "Momentum"]
    assert subtopics_parse(escaped, count=6) == expected
    assert subtopics_parse(mixed, count=6) == expected


def test_subtopics_parse_deeply_nested_answer_yields_nothing_instead_of_raising():
    # A model stuck repeating a bracket: unreadable (asked again), never a crash.
    assert subtopics_parse("[" * 5000, count=6) == []
    assert subtopics_parse('{"subtopics": ' + "[" * 5000 + "]" * 5000 + "}", count=6) == []


def test_subtopics_parse_bullets_in_markdown_keep_the_emphasised_name_only():
    text = "1. **Syntax**: how code is written\n2. **Types**\n3. `Modules` - packaging\n- Tests"
    assert subtopics_parse(text, count=6) == ["Syntax", "Types", "Modules", "Tests"]
    # Emphasis that is not the bullet's name is left as it is.
    assert subtopics_parse("- `async`/`await`\n- __init__ methods", count=6) == [
        "`async`/`await`",
        "__init__ methods",
    ]

"""Prompts of the topic endpoints (Django templates in templates/prompts/) and the robust
parsing of the model's subtopic lists."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from django.template.loader import get_template, render_to_string

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?|\n?\s*```\s*$")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(?P<item>.+?)\s*$")
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
# A bullet that starts with a name in bold or code, alone or before its description
# (`1. **Syntax**: how code is written`, `- `Modules` - packaging`).
_EMPHASISED = re.compile(
    r"^(?:\*\*(?P<bold>[^*]+)\*\*|`(?P<code>[^`]+)`)(?=\s*(?:$|[:(\-\u2013\u2014]))"
)
MAX_LABEL = 200


def prompt_render(name: str, **context: Any) -> str:
    """Render templates/prompts/<name>.txt (no HTML escaping), stripped."""
    return render_to_string(f"prompts/{name}.txt", context).strip()


@functools.cache
def prompts_version(*names: str) -> str:
    """A short hash of the sources of templates/prompts/<name>.txt, read once per process:
    part of the cache keys of the answers built from them, so that a deploy that changes a
    prompt does not serve the answers of the old one (they are left to expire)."""
    digest = hashlib.sha256()
    for name in names:
        # The DjangoTemplates backend's template wraps the engine's, which keeps its source.
        template = get_template(f"prompts/{name}.txt").template  # type: ignore[attr-defined]
        digest.update(f"{name}\x00{template.source}\x00".encode())
    return digest.hexdigest()[:12]


def subtopics_messages(*, topic: str, count: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": prompt_render("subtopics_system")},
        {"role": "user", "content": prompt_render("subtopics", topic=topic, count=count)},
    ]


def subtopics_retry_messages(
    *, topic: str, count: int, previous: list[dict[str, str]], answer: str, found: int = 0
) -> list[dict[str, str]]:
    """Ask again, showing the model its answer: unreadable (`found` 0) or short of `count`."""
    again = prompt_render("subtopics_retry", topic=topic, count=count, found=found)
    return [*previous, {"role": "assistant", "content": answer}, {"role": "user", "content": again}]


def explanation_messages(*, topic: str, subtopic: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": prompt_render("explanation_system")},
        {"role": "user", "content": prompt_render("explanation", topic=topic, subtopic=subtopic)},
    ]


def _closed_after_last_item(text: str) -> str | None:
    """JSON cut short (an answer that ran into max_tokens), cut after the last complete
    item of its innermost open array and closed; None if it is not cut short or holds no
    complete item."""
    closers: list[str] = []
    in_string = escaped = False
    cut: tuple[int, str] | None = None  # where the last whole item ends, what closes it
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if closers and closers[-1] == "]":
                    cut = (index + 1, "".join(reversed(closers)))
        elif char == '"':
            in_string = True
        elif char in "[{":
            closers.append("]" if char == "[" else "}")
        elif char in "]}":
            if not closers or closers.pop() != char:
                return None
            if closers and closers[-1] == "]":
                cut = (index + 1, "".join(reversed(closers)))
    if not closers or cut is None:
        return None
    return text[: cut[0]] + cut[1]


def _loads_lenient(text: str) -> Any:
    """JSON, or the first JSON object/array inside the text, with trailing commas and
    single quotes repaired, or its complete items if it was cut short; None when nothing
    parses."""
    candidates = [text]
    starts = [i for i in (text.find("{"), text.find("[")) if i != -1]
    if starts:
        # Before the pieces below: one of them may be a whole item of the cut list.
        closed = _closed_after_last_item(text[min(starts) :])
        if closed is not None:
            candidates.append(closed)
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if start != -1 and end > start:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
            try:
                return json.loads(attempt)
            except (ValueError, RecursionError):  # RecursionError: brackets nested deep
                continue
        # Python's notation (single quotes, an escaped apostrophe, double quotes around an
        # item holding one) before the blunt repair below, which would turn "Newton's
        # laws" into Newton"s laws. A literal only: nothing is run.
        try:
            literal = ast.literal_eval(candidate)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            literal = None
        if isinstance(literal, (list, dict)):
            return literal
        try:
            return json.loads(_TRAILING_COMMA.sub(r"\1", candidate.replace("'", '"')))
        except (ValueError, RecursionError):
            continue
    return None


def _label(item: Any) -> str:
    if isinstance(item, dict):
        for name in ("label", "name", "title", "subtopic", "topic"):
            if isinstance(item.get(name), str):
                return str(item[name])
        return ""
    return item if isinstance(item, str) else ""


def _bullet_name(item: str) -> str:
    """A bullet's subtopic: the name it puts in bold or code, if it starts with one (the
    rest is a description), else the whole bullet."""
    emphasised = _EMPHASISED.match(item)
    return (emphasised.group("bold") or emphasised.group("code")) if emphasised else item


def subtopics_parse(
    text: str, *, count: int, topic: str = "", known: Sequence[str] = ()
) -> list[str]:
    """The subtopic labels of a model's answer: JSON (`{"subtopics": [...]}` or a bare
    list, possibly fenced or surrounded by prose, with common syntax slips repaired), else
    a bulleted or numbered list. Deduplicated case-insensitively, never the topic itself,
    after the `known` labels (which it starts with), at most `count`; empty when nothing
    usable was found."""
    body = _FENCE.sub("", text.strip())
    data = _loads_lenient(body)
    items: list[Any] = []
    if isinstance(data, dict):
        found = data.get("subtopics") or next((v for v in data.values() if isinstance(v, list)), [])
        items = found if isinstance(found, list) else []
    elif isinstance(data, list):
        items = data
    if not items:
        items = [_bullet_name(m.group("item")) for m in map(_BULLET.match, body.splitlines()) if m]
    labels: list[str] = list(known)
    seen = {label.casefold() for label in known} | {" ".join(topic.split()).casefold()}
    for item in items:
        label = " ".join(_label(item).split()).strip(" \"'")[:MAX_LABEL]
        if label and label.casefold() not in seen:
            seen.add(label.casefold())
            labels.append(label)
    return labels[:count]


def topic_graph(*, topic: str, subtopics: list[str]) -> dict[str, list[dict[str, str]]]:
    """Nodes (the root is the topic itself) and an edge from the root to every subtopic."""
    nodes = [{"id": "root", "label": topic}]
    edges = []
    for index, label in enumerate(subtopics, start=1):
        nodes.append({"id": f"s{index}", "label": label})
        edges.append({"source": "root", "target": f"s{index}"})
    return {"nodes": nodes, "edges": edges}

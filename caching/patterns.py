"""The pattern language of cache invalidation: a glob over logical cache keys.

A key looks like ``topic:python programming:subtopics:<hash>`` or ``gen:<hash>`` (see
caching/services.py). In a pattern, ``*`` stands for any run of characters (none
included, colons included), ``?`` for one character, ``[abc]`` for one of a set,
``[a-z]`` for one of a range, ``[^abc]`` or ``[!abc]`` for one character outside the set,
and ``\\x`` for ``x`` itself (``\\*``, ``\\[``, ``\\\\``); every other character stands
for itself. Matching ignores case, as the keys' topics do: a topic is stored lower-cased
(`topic_normalise`), so ``topic:Python*`` means what a person typing it means. A pattern
that does not parse (an unclosed ``[``, an empty set, a range that runs backwards, a
trailing lone ``\\``) is refused with `PatternError` rather than matched as something else.

The same compiled pattern decides for the memory layer and for Redis, where it also gives
SCAN the literal start of the keys it can match (`KeyPattern.namespace`, `.scan_prefix`),
so that the server filters most keys out before they cross the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REDIS_GLOB_CHARS = frozenset("*?[]\\^-")


class PatternError(ValueError):
    """A pattern that does not parse; the message says where and why, for a person."""


@dataclass(frozen=True, slots=True)
class KeyPattern:
    """A compiled invalidation pattern.

    `text`: as given. `namespace`: the namespace every matching key is in, lower-cased,
    when the pattern starts with one written out (``topic:``), else None. `scan_prefix`: a
    Redis glob (without its closing ``*``) that matches, case-insensitively, the literal
    start of the keys' rest after ``<namespace>:`` (or of the whole key without a
    namespace); it only narrows a SCAN, `matches` decides.
    """

    text: str
    regex: re.Pattern[str]
    namespace: str | None
    scan_prefix: str

    def matches(self, key: str) -> bool:
        """Whether the logical cache key `key` matches, case ignored."""
        return self.regex.fullmatch(key) is not None


def pattern_compile(text: str) -> KeyPattern:
    """Compile an invalidation pattern (the language is in the module docstring).

    Raises PatternError for a pattern that does not parse.
    """
    segments: list[list[str]] = [[]]  # the regular expression between stars, piece by piece
    literal: list[str] = []  # the characters before the first wildcard
    wild = False
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 == len(text):
                raise PatternError(
                    "The pattern ends with a lone \\; write \\\\ for a backslash itself."
                )
            segments[-1].append(re.escape(text[i + 1]))
            if not wild:
                literal.append(text[i + 1])
            i += 2
            continue
        if char == "*":
            wild = True
            if segments[-1] or len(segments) == 1:  # a run of stars is one star
                segments.append([])
        elif char == "?":
            wild = True
            segments[-1].append(".")
        elif char == "[":
            wild = True
            one_of, i = _set(text, i)
            segments[-1].append(one_of)
            continue
        else:
            segments[-1].append(re.escape(char))
            if not wild:
                literal.append(char)
        i += 1
    regex = _compiled(["".join(segment) for segment in segments])
    start = "".join(literal)
    namespace, colon, rest = start.partition(":")
    if colon and namespace:
        return KeyPattern(text, regex, namespace.lower(), _redis_nocase_prefix(rest))
    return KeyPattern(text, regex, None, _redis_nocase_prefix(start))


def _compiled(segments: list[str]) -> re.Pattern[str]:
    """The regular expression of the fixed-length `segments` a pattern's stars separate.
    Each middle segment is taken where it first occurs and never given back (an atomic
    group, as fnmatch does): a glob needs no more, and `*a*a*a...` cannot make the match
    backtrack for ever."""
    if len(segments) == 1:  # no star
        body = segments[0]
    else:
        head, *middle, tail = segments
        body = head + "".join(f"(?>.*?{segment})" for segment in middle) + ".*" + tail
    return re.compile(body, re.IGNORECASE | re.DOTALL)


def _set(text: str, start: int) -> tuple[str, int]:
    """The regular expression of the set opening at `start` (a ``[``), and the index just
    past its ``]``."""

    def unclosed() -> PatternError:
        return PatternError(
            f"The [ at position {start + 1} opens a set that is never closed with ]; "
            "write \\[ for a bracket itself."
        )

    def one(i: int) -> tuple[str, int]:  # the character at i (escaped or not), and past it
        if i >= len(text):
            raise unclosed()
        if text[i] != "\\":
            return text[i], i + 1
        if i + 1 >= len(text):
            raise unclosed()
        return text[i + 1], i + 2

    i = start + 1
    negated = i < len(text) and text[i] in "^!"
    if negated:
        i += 1
    pieces: list[str] = []
    while True:
        if i >= len(text):
            raise unclosed()
        if text[i] == "]":
            break
        low, i = one(i)
        # A "-" between two characters makes a range; first or last, it is itself.
        if i + 1 < len(text) and text[i] == "-" and text[i + 1] != "]":
            high, i = one(i + 1)
            if high < low:
                raise PatternError(
                    f"The range {low}-{high} in the set at position {start + 1} runs "
                    "backwards; write the lower character first."
                )
            pieces.append(f"{re.escape(low)}-{re.escape(high)}")
        else:
            pieces.append(re.escape(low))
    if not pieces:
        raise PatternError(f"The set at position {start + 1} is empty.")
    return f"[{'^' if negated else ''}{''.join(pieces)}]", i + 1


def _redis_nocase_prefix(literal: str) -> str:
    """A Redis glob matching `literal` in any case: ASCII letters become ``[xX]``, glob
    characters are escaped. Redis compares bytes, so it stops before the first character
    that is not ASCII (that one and the rest are left to `KeyPattern.matches`)."""
    out: list[str] = []
    for char in literal:
        if not char.isascii():
            break
        if char.isalpha():
            out.append(f"[{char.lower()}{char.upper()}]")
        elif char in _REDIS_GLOB_CHARS:
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)

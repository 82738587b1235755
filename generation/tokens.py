"""Token estimation before an upstream call.

tiktoken cannot fetch its encoding files on these machines (no network), so Tollgate uses
this deterministic estimator instead. It splits text the way GPT-style BPE pre-tokenizers
do (words with their leading space, digit runs, punctuation runs, whitespace) and charges
one token per common word (one per five letters of a long word), one per three digits and
one per punctuation character, which lands close to cl100k on English prose and code.
The estimate only sizes the admission reservation; the charge comes from the
provider's usage report (the estimate is used only where a provider reports none, and by
the offline `local` provider, which has no tokenizer of its own).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_PIECES = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+""", re.UNICODE)
# Chat formatting overhead per message and for the reply's priming (OpenAI's recipe).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


def _piece_tokens(piece: str) -> int:
    body = piece.lstrip(" ")
    if not body:
        return 1 if piece else 0
    if body[0].isdigit():
        return (len(body) + 2) // 3
    if body[0].isalpha():
        if not body.isascii():
            # Non-Latin scripts: about one token per two characters.
            return (len(body) + 1) // 2
        # Common words up to seven letters are one token; longer ones split in chunks.
        return 1 if len(body) <= 7 else (len(body) + 4) // 5
    if body.isspace():
        return 1
    return len(body)


def tokens_count(text: str) -> int:
    """Estimated number of tokens of `text` (0 for an empty string)."""
    if not text:
        return 0
    return sum(_piece_tokens(m.group(0)) for m in _PIECES.finditer(text))


def tokens_count_messages(messages: Iterable[Mapping[str, str]]) -> int:
    """Estimated prompt tokens of a chat: content, role and formatting overhead."""
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE + tokens_count(message.get("content", ""))
        total += tokens_count(message.get("role", ""))
    return total

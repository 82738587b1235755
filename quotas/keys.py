"""API key format: tg_<8 lowercase alphanumerics>_<secret of 43 url-safe chars>.

Only the prefix and the SHA-256 of the secret are stored. The secret carries 256 bits of
entropy, so a plain (unsalted) hash is safe against guessing and keeps look-ups O(1).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string

_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
KEY_RE = re.compile(r"^tg_([a-z0-9]{8})_([A-Za-z0-9_-]{32,128})$")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_generate() -> tuple[str, str, str]:
    """A new key: (full key shown once, prefix, hash of the secret)."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    secret = secrets.token_urlsafe(32)
    return f"tg_{prefix}_{secret}", prefix, hash_secret(secret)


def key_parse(raw: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    match = KEY_RE.match(raw.strip())
    if match is None:
        return None
    return match.group(1), match.group(2)


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)

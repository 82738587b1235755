"""API keys: creation (the key shown once), revocation, extension, last use."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone

from quotas import keys
from quotas.models import DIMENSIONS, ApiKey

# --- keys ------------------------------------------------------------------------------------

_last_touch: dict[int, float] = {}


def key_create(
    *,
    user: Any,
    name: str = "",
    scopes: Iterable[str] = (),
    expires_at: datetime | None = None,
    **limits: Any,
) -> tuple[str, ApiKey]:
    """Create an API key; returns (the full key, shown once, and the stored row)."""
    unknown = set(limits) - set(DIMENSIONS)
    if unknown:
        raise ValueError(f"unknown limit fields: {sorted(unknown)}")
    for _ in range(5):
        full, prefix, secret_hash = keys.key_generate()
        if not ApiKey.objects.filter(prefix=prefix).exists():
            break
    key = ApiKey.objects.create(
        user=user,
        name=name,
        prefix=prefix,
        secret_hash=secret_hash,
        scopes=list(scopes),
        expires_at=expires_at,
        **limits,
    )
    return full, key


def key_revoke(*, key: ApiKey) -> ApiKey:
    """Revoke a key; it is refused on every worker within a second."""
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


def key_extend(*, key: ApiKey, days: int = 30) -> ApiKey:
    """Push a key's expiry `days` further (from now if it has none or has expired)."""
    base = key.expires_at if key.expires_at and key.expires_at > timezone.now() else timezone.now()
    key.expires_at = base + timedelta(days=days)
    key.save(update_fields=["expires_at"])
    return key


def key_touch(*, key_id: int, last_used_at: datetime | None = None) -> None:
    """Record that a key was used; at most one write a minute per key and process. While
    the database is unreachable or hung the write is skipped (tried again a minute later):
    a request whose key is still accepted from the outage's grace is not refused for it."""
    now = time.monotonic()
    if now - _last_touch.get(key_id, -1e9) < 60:
        return
    _last_touch[key_id] = now
    moment = timezone.now()
    if last_used_at is not None and (moment - last_used_at).total_seconds() < 60:
        return
    try:
        ApiKey.objects.filter(pk=key_id).update(last_used_at=moment)
    except (OperationalError, InterfaceError):
        # The outage is told once by the key cache and the ledger; a line per key and
        # minute would only repeat it.
        if connection.in_atomic_block:
            raise


def new_request_id() -> str:
    return uuid.uuid4().hex

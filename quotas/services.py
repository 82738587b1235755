"""Quota services (public interface used by the other apps). Implementation in progress."""

from __future__ import annotations

import time

from django.utils import timezone

from quotas.models import ApiKey

_last_touch: dict[int, float] = {}


def key_touch(*, key_id: int, last_used_at: object = None) -> None:
    """Record that a key was used; writes at most once a minute per key per process."""
    now = time.monotonic()
    if now - _last_touch.get(key_id, -1e9) < 60:
        return
    _last_touch[key_id] = now
    ApiKey.objects.filter(pk=key_id).update(last_used_at=timezone.now())


def policy_bump() -> None:
    """Invalidate every worker's policy cache."""

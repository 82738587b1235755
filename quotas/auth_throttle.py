"""Failed authentications per client address: counted in the shared cache (every worker
sees every failure), with the block remembered in-process so that the hot path of a valid
key pays nothing for it."""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.core.cache import cache

from config.outages import default_redis_outage, redis_unanswered

logger = logging.getLogger("tollgate.auth")
_WINDOW = 60
_blocked: dict[str, float] = {}
_lock = threading.Lock()


def blocked_for(address: str) -> int:
    """Seconds this address stays blocked in this process (0: not blocked)."""
    until = _blocked.get(address)
    if until is None:
        return 0
    left = until - time.monotonic()
    if left <= 0:
        with _lock:
            _blocked.pop(address, None)
        return 0
    return max(1, int(left + 0.999))


def record_failure(address: str) -> int:
    """Count one failure; the number of seconds to block for once past the limit, else 0."""
    bucket = int(time.time() // _WINDOW)
    key = f"authfail:{address}:{bucket}"
    outage = default_redis_outage()
    if outage is not None and outage.away():  # not counted, as when the cache fails
        return 0
    try:
        count = 1 if cache.add(key, 1, timeout=_WINDOW * 2) else cache.incr(key)
    except Exception as exc:  # noqa: BLE001 - the cache is down: do not turn a 401 into a 500
        if outage is not None and redis_unanswered(exc):
            outage.failed(exc)
        logger.warning("auth failure counter unavailable", exc_info=True)
        return 0
    if outage is not None:
        outage.answered()
    if count <= settings.AUTH_FAILURES_PER_MINUTE:
        return 0
    retry = _WINDOW - int(time.time() % _WINDOW)
    with _lock:
        _blocked[address] = time.monotonic() + retry
    return retry


def reset() -> None:
    with _lock:
        _blocked.clear()

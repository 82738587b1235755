"""The gauges of state that lives in Redis (shared quota headroom, circuit states), set
from Redis itself at each scrape, so that a scrape sees the truth and not what this worker
last noticed."""

from __future__ import annotations

import logging
import threading

from django.db import InterfaceError, OperationalError

from config.errors import is_database_not_migrated

logger = logging.getLogger(__name__)


class _Trouble:
    """Why the shared quota gauges were not refreshed, said when it begins (or turns into
    another reason) and when it ends, not at every scrape: Prometheus scrapes every few
    seconds, and a database not migrated yet or unreachable, or Redis away, lasts. A known
    reason is one line; an unexpected error keeps its traceback, once. Per process."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._lock = threading.Lock()

    def failed(
        self,
        reason: str,
        detail: str = "",
        *,
        level: int = logging.WARNING,
        exc: Exception | None = None,
    ) -> None:
        with self._lock:
            if reason == self.reason:
                return
            self.reason = reason
        said = f"{reason}: {detail}" if detail else reason
        logger.log(level, "shared quota gauges not refreshed: %s", said, exc_info=exc)

    def refreshed(self) -> None:
        with self._lock:
            was, self.reason = self.reason, None
        if was is not None:
            logger.warning("shared quota gauges refreshed again")


_trouble = _Trouble()


def gauges_trouble_reset() -> None:
    """Forget why the gauges were last not refreshed (tests)."""
    _trouble.reason = None


def shared_gauges_refresh() -> None:
    """Set tollgate_quota_remaining of every global and provider window and the circuit
    gauges from Redis. Never raises: a scrape answers with Redis or the database down."""
    from generation.services import circuit_gauges_refresh
    from quotas.services import quota_global

    try:
        live = quota_global()["backend"]["live"]
    except Exception as exc:  # noqa: BLE001 - said once, by reason
        detail = str(exc).split("\n", 1)[0]
        if is_database_not_migrated(exc):
            _trouble.failed("database not migrated", detail, level=logging.ERROR)
        elif isinstance(exc, OperationalError | InterfaceError):
            _trouble.failed("database unreachable", detail)
        else:
            _trouble.failed(type(exc).__name__, detail, exc=exc)
    else:
        if live:
            _trouble.refreshed()
        else:
            _trouble.failed("quota counters unavailable (Redis unreachable)")
    try:
        circuit_gauges_refresh()
    except Exception:
        logger.warning("circuit gauges not refreshed", exc_info=True)

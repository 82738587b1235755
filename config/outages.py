"""A backing service that one part of a worker found unreachable.

That part leaves the service alone for `retry_seconds` after each failure (a service that
hangs would otherwise cost every request its timeout) and says once that the outage began
and once that it ended, not once per request. The circuit breaker's Redis, authentication's
and the ledger's PostgreSQL each keep one; the quota engine and the cache tier have their
own, which also rebuild state when Redis is back.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any


class Outage:
    def __init__(
        self, logger: logging.Logger, *, began: str, ended: str, retry_seconds: float = 1.0
    ) -> None:
        """`began`: the message (with %-arguments given to `failed`) when the first failure
        is seen; `ended`: the one (with the outage's length in seconds) when the service
        answers again."""
        self.logger, self.began, self.ended = logger, began, ended
        self.retry_seconds = retry_seconds
        self.since: float | None = None  # the outage's start, while there is one
        self.retry_at = 0.0  # time.monotonic() before which the service is not asked
        _every.add(self)

    def away(self) -> bool:
        """True while the service is not to be asked: it failed less than retry_seconds ago."""
        return time.monotonic() < self.retry_at

    def failed(self, *args: Any) -> None:
        now = time.monotonic()
        self.retry_at = now + self.retry_seconds
        if self.since is None:
            self.since = now
            self.logger.warning(self.began, *args)

    def answered(self) -> None:
        if self.since is not None:
            self.logger.warning(self.ended, time.monotonic() - self.since)
            self.reset()

    def reset(self) -> None:
        self.since, self.retry_at = None, 0.0


_every: weakref.WeakSet[Outage] = weakref.WeakSet()


def outages_reset() -> None:
    """Forget every outage this process has seen (a test's fresh start)."""
    for outage in list(_every):
        outage.reset()

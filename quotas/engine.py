"""Shared vocabulary of the quota backends: what a decision looks like."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from quotas.policy import Quota


@dataclass(frozen=True, slots=True)
class WindowState:
    """One quota after a decision: how much of it is used and when it next frees up."""

    quota: Quota
    used: int
    reset_in: float

    @property
    def remaining(self) -> int:
        return max(0, self.quota.limit - self.used)


@dataclass(frozen=True, slots=True)
class CacheGate:
    """A cache look-up done by the admission script itself, so that a cache miss costs one
    round trip for both. `entry`: the Redis key of the answer (the cache tier's layout,
    caching/tier.py); if it holds a fresh answer, the request is counted as a cache hit
    (request windows only) instead of admitted in full. `lock`: the single-flight lock
    that a full admission takes (SET NX, `token`, `lock_ms`; none if `lock_ms` is 0)."""

    entry: str
    lock: str
    token: str
    lock_ms: int


@dataclass(slots=True)
class Decision:
    admitted: bool
    windows: list[WindowState] = field(default_factory=list)
    denied: WindowState | None = None
    retry_after: float = 0.0
    backend: str = "redis"
    # With a CacheGate: whether the script looked the entry up (not in degraded mode), the
    # stored entry (fresh or stale; None: there is none), whether it turned the request
    # into a hit, and whether the lock was taken.
    looked_up: bool = False
    entry: bytes | None = None
    hit: bool = False
    locked: bool = False


class StalePolicy(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The backend's policy version or counter epoch moved: reload and try again."""

    def __init__(self, version: str, epoch: str) -> None:
        super().__init__(version, epoch)
        self.version = version
        self.epoch = epoch


class RebuildNeeded(Exception):  # noqa: N818
    """Calendar counters are missing from Redis and must be rebuilt from the ledger."""

    def __init__(self, quotas: list[Quota]) -> None:
        super().__init__(quotas)
        self.quotas = quotas


class BackendUnavailable(Exception):  # noqa: N818
    """The shared quota store (Redis) cannot serve now: unreachable, or answering that it
    cannot (out of memory, read-only...)."""


class BackendAway(BackendUnavailable):
    """Redis did not answer (refused, timed out), or is left alone meanwhile because some
    part of this worker found it so: its server's Outage (config.outages) times the next
    try, not the quota engine."""


def calendar_bounds(now: float) -> tuple[datetime, datetime, datetime, datetime]:
    """(day start, day end, month start, month end) in UTC around `now`."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    day_start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    day_end = day_start + timedelta(days=1)
    month_start = day_start.replace(day=1)
    month_end = (month_start + timedelta(days=32)).replace(day=1)
    return day_start, day_end, month_start, month_end


def seconds_left(now: float) -> tuple[int, int]:
    """Whole seconds to the end of the UTC day and of the UTC month (at least 1)."""
    _, day_end, _, month_end = calendar_bounds(now)
    return (
        max(1, math.ceil(day_end.timestamp() - now)),
        max(1, math.ceil(month_end.timestamp() - now)),
    )

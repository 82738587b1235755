"""Process state of the quota services: the backend, the policy cache and its version."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Protocol

from django.conf import settings

from config.errors import ApiError, InvalidRequest
from config.redis_calls import ScriptCall
from quotas.engine import (
    BackendUnavailable,
    CacheGate,
    Decision,
    StalePolicy,
    WindowState,
)
from quotas.errors import ModelNotAllowed, UserSuspended
from quotas.local_backend import LocalQuotaBackend
from quotas.models import ModelPrice
from quotas.policy import Policy, Quota, policy_resolve

logger = logging.getLogger("tollgate.quotas")


class QuotaBackend(Protocol):
    name: str

    def away(self) -> bool: ...
    def admit(
        self,
        *,
        quotas: tuple[Quota, ...],
        request_id: str,
        version: str,
        epoch: str,
        est_tokens: int,
        est_cost: int,
        mode: str,
        now: float,
        gate: CacheGate | None = None,
    ) -> Decision: ...
    def settle(
        self,
        *,
        request_id: str,
        tokens: int,
        cost: int,
        refund: bool,
        riders: Sequence[ScriptCall] = (),
        meanwhile: Callable[[], None] | None = None,
    ) -> bool: ...
    def renew(self, *, request_id: str, now: float) -> bool: ...
    def carried(self, epoch: str) -> list[str]: ...
    def init_calendar(
        self,
        entries: list[tuple[str, int, int, int, int]],
        in_ledger: Iterable[str] = (),
        *,
        epoch: str = "",
    ) -> int: ...
    def counter_key(self, quota: Quota, epoch: str, now: float) -> str: ...
    def tokens(self) -> tuple[str, str]: ...
    def bump_version(self) -> None: ...
    def rotate_epoch(self) -> None: ...
    def read(
        self, *, quotas: tuple[Quota, ...], version: str, epoch: str, now: float
    ) -> list[WindowState]: ...
    def reset_counters(self, *, counter: str) -> int: ...
    def denials(self, *, day: str) -> dict[str, int]: ...
    def sweep(self, *, now: float, limit: int = 100) -> int: ...


# --- process state ---------------------------------------------------------------------


@dataclass
class _State:
    backend: QuotaBackend | None = None
    fallback: LocalQuotaBackend = field(default_factory=LocalQuotaBackend)
    version: str = ""
    epoch: str = ""
    # A resolved policy, or the refusal a resolution ended in, and when it was resolved.
    policies: dict[tuple[int, int | None, str | None], tuple[Policy | ApiError, float]] = field(
        default_factory=dict
    )
    degraded_since: float | None = None
    # While degraded, Redis is not tried again before this time.monotonic(), unless 0.0:
    # Redis did not answer, and its server's Outage (config.outages) times the next try.
    next_redis_try: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Settlements Redis could not take: (request id, tokens, micro-USD, refund), sent again
    # before the next admission that reaches it.
    deferred: deque[tuple[str, int, int, bool]] = field(
        default_factory=lambda: deque(maxlen=_DEFERRED_MAX)
    )
    deferred_lock: threading.Lock = field(default_factory=threading.Lock)
    # A governance change whose version bump Redis did not take: bumped again before the
    # next admission that reaches it, so that the other workers hear of the change.
    bump_pending: bool = False
    # Fail-open admissions: a calendar window's (counter, start) -> (cut, read at, highest
    # row id then, sums of its ledger rows older than the cut): `ledger_usages_failopen`.
    ledger_older: dict[tuple[str, datetime], tuple[datetime, float, int, tuple[int, int, int]]] = (
        field(default_factory=dict)
    )


# Beyond this many, the oldest deferred settlement is left to the sweep (which refunds its
# reservation when its lease expires; its ledger row already holds the cost).
_DEFERRED_MAX = 10_000

_state = _State()


def backend() -> QuotaBackend:
    """The shared backend: Redis when REDIS_URL is set, else the in-process one."""
    if _state.backend is None:
        if settings.REDIS_URL:
            from quotas.redis_backend import RedisQuotaBackend

            _state.backend = RedisQuotaBackend()
        else:
            _state.backend = LocalQuotaBackend()
    return _state.backend


def local_state_reset() -> None:
    """Forget every in-process cache and counter (tests; a fresh worker).

    The state object is reset in place: the other modules of the package hold it by name.
    """
    from quotas.services.apikeys import _last_touch

    fresh = _State()
    for item in fields(_State):
        setattr(_state, item.name, getattr(fresh, item.name))
    _last_touch.clear()


def settlement_defer(*, request_id: str, tokens: int, cost: int, refund: bool) -> None:
    """Keep a settlement Redis did not take, to send it again (`deferred_settle`)."""
    _state.deferred.append((request_id, tokens, cost, refund))


def deferred_settle() -> None:
    """Send the deferred settlements again, oldest first, until Redis fails again (raises
    BackendUnavailable; the rest wait for the next try). settle.lua takes each as it would
    have then: a reservation the sweep refunded meanwhile is charged its actual usage, as
    any late settlement; one already settled, or lost with a restarted Redis (whose
    counters are rebuilt from the ledger), is left as it is. One thread at a time."""
    if not _state.deferred_lock.acquire(blocking=False):
        return
    try:
        while _state.deferred:
            request_id, tokens, cost, refund = _state.deferred[0]
            try:
                backend().settle(request_id=request_id, tokens=tokens, cost=cost, refund=refund)
            except BackendUnavailable:
                raise
            except Exception:  # a reply Redis will not change its mind about: let it go
                logger.exception("deferred settlement of %s dropped", request_id)
            else:
                logger.info("deferred settlement of %s done", request_id)
            _state.deferred.popleft()
    finally:
        _state.deferred_lock.release()


# --- policy ------------------------------------------------------------------------------


def catalogue_providers() -> list[str]:
    """The providers that serve the enabled models of the catalogue."""
    rows = ModelPrice.objects.filter(enabled=True).values_list("provider", flat=True)
    return sorted(set(rows))


# Refusals that only a change of governance rows can lift (the catalogue, a plan, a user's
# quota row, a key's scopes). A refusal is remembered for at most a second: a worker learns
# of a new policy version only from its admissions, and a refused request makes none.
_REMEMBERED_REFUSALS = (InvalidRequest, ModelNotAllowed, UserSuspended)
# How long a cache entry lives without a version to check it against: a refusal always, a
# policy while Redis is unreachable or absent. "Within a second" is the promise of a live
# change.
_UNCHECKED_TTL = 1.0


def policy_get(*, user_id: int, key_id: int | None, model: str | None) -> Policy:
    """The effective policy, from the process cache or the database (`model=None`: the
    caller's own limits whatever the model, see `quotas.policy.policy_resolve`).

    Raises the resolution errors of `quotas.policy.policy_resolve` (400, 401, 403). An
    unknown model or a refused one is remembered for a second, so that a flood of such
    requests does not cost a handful of SQL queries each.
    """
    cache_key = (user_id, key_id, model)
    cached = _state.policies.get(cache_key)
    now = time.monotonic()
    if cached is not None:
        found, at = cached
        if isinstance(found, Policy):
            # Redis's shared version tells of a change. Without it (Redis unreachable, or the
            # embedded default, whose database a shell or a command may change from another
            # process) a policy lives a second. A key's expiry changes nothing anywhere: a
            # policy whose key has expired is resolved again, which refuses it (a batch
            # job's items are admitted long after its request was authenticated).
            shared = _state.degraded_since is None and backend().name == "redis"
            expired = found.key_expires_at is not None and found.key_expires_at <= time.time()
            if (shared or now - at < _UNCHECKED_TTL) and not expired:
                return found
        elif now - at < _UNCHECKED_TTL:
            raise copy.copy(found)  # a fresh instance: one raised twice grows its traceback
    # A change may land while the rows are read: the version learned meanwhile (`_on_stale`,
    # which empties the cache) must not end up holding what was read before it.
    version = _state.version
    try:
        policy = policy_resolve(user_id=user_id, key_id=key_id, model=model)
    except _REMEMBERED_REFUSALS as refusal:
        _policy_remember(cache_key, copy.copy(refusal), now, version)
        raise
    _policy_remember(cache_key, policy, now, version)
    return policy


def _policy_remember(
    cache_key: tuple[int, int | None, str | None],
    found: Policy | ApiError,
    now: float,
    version: str | None,
) -> None:
    """Cache `found`, read while the policy version was `version`, unless it has changed
    since: the next request reads the rows again."""
    with _state.lock:
        if _state.version != version:
            return
        if len(_state.policies) > 50_000:
            _state.policies.clear()
        _state.policies[cache_key] = (found, now)


def policy_bump() -> None:
    """A governance row changed: every worker reloads its policies on its next admission."""
    with _state.lock:
        _state.policies.clear()
    from quotas.authentication import key_cache_clear

    key_cache_clear()
    try:
        backend().bump_version()
    except BackendUnavailable:
        logger.warning("policy version not bumped yet: quota backend unavailable")
        _state.bump_pending = True
    else:
        _state.bump_pending = False


def _on_stale(exc: StalePolicy) -> None:
    with _state.lock:
        if exc.version != _state.version:
            _state.policies.clear()
            from quotas.authentication import key_cache_clear

            key_cache_clear()
        _state.version, _state.epoch = exc.version, exc.epoch

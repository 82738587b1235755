"""Quota services: admission, settlement, refunds, the ledger, keys and live policy.

The hot path is two calls: `admission_admit` (one Redis round trip: every window of every
scope checked and reserved all or nothing) and `usage_settle` (one Redis round trip and one
ledger INSERT). Policies are cached in the process and validated by the admission script
itself: it compares the caller's policy version with the live one and answers "stale"
instead of admitting, so a change saved anywhere holds on the very next admission of every
worker, at no extra round trip.

If Redis is unreachable, QUOTA_FAIL_MODE decides: `closed` refuses with 503
quota_unavailable; `open` admits through an in-process limiter for request windows and
concurrency (limits divided by QUOTA_WORKER_COUNT) and checks every token and cost budget,
and the calendar request windows, against the ledger under a PostgreSQL advisory lock per
principal: nothing fails open on money. When Redis answers again the counter epoch is
rotated so that day and month counters are rebuilt from the ledger, which holds what was
spent meanwhile.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from health import metrics
from quotas import keys
from quotas.engine import (
    BackendUnavailable,
    Decision,
    RebuildNeeded,
    StalePolicy,
    WindowState,
    calendar_bounds,
    seconds_left,
)
from quotas.errors import QuotaExceeded, QuotaUnavailable
from quotas.local_backend import LocalQuotaBackend
from quotas.models import DIMENSIONS, ApiKey, DenialCount, Outcome, UsageRecord
from quotas.policy import PRIORITIES, Policy, Quota, micros_to_usd, policy_resolve, usd_to_micros

logger = logging.getLogger("tollgate.quotas")

COUNTED_OUTCOMES = (Outcome.OK, Outcome.CACHED, Outcome.PENDING)


class QuotaBackend(Protocol):
    name: str

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
    ) -> Decision: ...
    def settle(self, *, request_id: str, tokens: int, cost: int, refund: bool) -> bool: ...
    def init_calendar(self, entries: list[tuple[str, int, int, int, int]]) -> int: ...
    def counter_key(self, quota: Quota, epoch: str, now: float) -> str: ...
    def tokens(self) -> tuple[str, str]: ...
    def bump_version(self) -> None: ...
    def rotate_epoch(self) -> None: ...
    def read(self, *, quotas: tuple[Quota, ...], epoch: str, now: float) -> list[WindowState]: ...
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
    policies: dict[tuple[int, int | None, str], tuple[Policy, float]] = field(default_factory=dict)
    degraded_since: float | None = None
    next_redis_try: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


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
    """Forget every in-process cache and counter (tests; a fresh worker)."""
    global _state  # noqa: PLW0603
    _state = _State()
    _last_touch.clear()


# --- policy ------------------------------------------------------------------------------


def policy_get(*, user_id: int, key_id: int | None, model: str) -> Policy:
    """The effective policy, from the process cache or the database.

    Raises the resolution errors of `quotas.policy.policy_resolve` (400, 401, 403).
    """
    cache_key = (user_id, key_id, model)
    cached = _state.policies.get(cache_key)
    now = time.monotonic()
    # Without Redis there is no shared version to check against: a policy lives 1 s.
    if cached is not None and (_state.degraded_since is None or now - cached[1] < 1.0):
        return cached[0]
    policy = policy_resolve(user_id=user_id, key_id=key_id, model=model)
    with _state.lock:
        if len(_state.policies) > 50_000:
            _state.policies.clear()
        _state.policies[cache_key] = (policy, now)
    return policy


def policy_bump() -> None:
    """A governance row changed: every worker reloads its policies on its next admission."""
    with _state.lock:
        _state.policies.clear()
    from quotas.authentication import key_cache_clear

    key_cache_clear()
    try:
        backend().bump_version()
    except BackendUnavailable:
        logger.warning("policy version not bumped: quota backend unavailable")


def _on_stale(exc: StalePolicy) -> None:
    with _state.lock:
        if exc.version != _state.version:
            _state.policies.clear()
            from quotas.authentication import key_cache_clear

            key_cache_clear()
        _state.version, _state.epoch = exc.version, exc.epoch


# --- admission ---------------------------------------------------------------------------


_POLICY_NAMES = {
    ("r", 60): "rpm",
    ("r", 3600): "rph",
    ("r", "day"): "rpd",
    ("t", 60): "tpm",
    ("t", "day"): "tpd",
}
_WINDOW_SECONDS = {60: 60, 3600: 3600, "day": 86400, "month": 2592000}


def _tightest(windows: Iterable[WindowState], kind: str) -> WindowState | None:
    candidates = [w for w in windows if w.quota.kind == kind]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.remaining, _WINDOW_SECONDS.get(w.quota.window, 0)))


def ratelimit_headers(windows: Iterable[WindowState]) -> dict[str, str]:
    """API.md's rate-limit headers for the tightest request window and token window."""
    windows = list(windows)
    headers: dict[str, str] = {}
    req = _tightest(windows, "r")
    if req is not None:
        name = _POLICY_NAMES.get((req.quota.kind, req.quota.window), "requests")
        reset = max(0, math.ceil(req.reset_in))
        window = _WINDOW_SECONDS.get(req.quota.window, 60)
        headers["RateLimit-Policy"] = f'"{name}";q={req.quota.limit};w={window}'
        headers["RateLimit"] = f'"{name}";r={req.remaining};t={reset}'
        headers["X-RateLimit-Limit-Requests"] = str(req.quota.limit)
        headers["X-RateLimit-Remaining-Requests"] = str(req.remaining)
        headers["X-RateLimit-Reset-Requests"] = f"{reset}s"
    tok = _tightest(windows, "t")
    if tok is not None:
        headers["X-RateLimit-Limit-Tokens"] = str(tok.quota.limit)
        headers["X-RateLimit-Remaining-Tokens"] = str(tok.remaining)
        headers["X-RateLimit-Reset-Tokens"] = f"{max(0, math.ceil(tok.reset_in))}s"
    return headers


@dataclass
class Admission:
    """A request let through: what was reserved, for settlement and the response headers."""

    request_id: str
    policy: Policy
    priority: str
    prompt_tokens: int
    max_tokens: int
    est_tokens: int
    est_cost: int  # micro-USD
    windows: list[WindowState]
    backend: str
    cached: bool = False
    at: float = field(default_factory=time.time)  # admission time: the ledger row's date
    started: float = field(default_factory=time.monotonic)

    def headers(self) -> dict[str, str]:
        return ratelimit_headers(self.windows)


def _refuse(decision: Decision, policy: Policy) -> QuotaExceeded:
    denied = decision.denied
    assert denied is not None  # noqa: S101 - a refusal always names its quota
    quota = denied.quota
    metrics.QUOTA_DECISIONS.labels("denied", quota.scope, quota.dimension).inc()
    exc = QuotaExceeded(
        scope=quota.scope,
        dimension=quota.dimension,
        limit=quota.display_limit(),
        retry_after=decision.retry_after,
    )
    exc.headers = ratelimit_headers(decision.windows)
    exc.policy = policy  # lets the caller serve a stale answer
    return exc


def _admit(
    *,
    user_id: int,
    key_id: int | None,
    model: str,
    request_id: str,
    priority: str,
    prompt_tokens: int,
    max_tokens: int,
    mode: str,
    now: float | None,
) -> Admission:
    if priority not in PRIORITIES:
        priority = "high"
    moment = time.time() if now is None else now
    for _ in range(5):
        policy = policy_get(user_id=user_id, key_id=key_id, model=model)
        quotas = policy.quotas_for(priority)
        if mode == "hit":
            quotas = tuple(q for q in quotas if q.kind == "r")
            est_tokens, est_cost = 0, 0
        else:
            est_tokens = prompt_tokens + max_tokens
            est_cost = usd_to_micros(policy.cost_of(prompt_tokens, max_tokens))
        try:
            if _state.degraded_since is not None:
                if time.monotonic() < _state.next_redis_try:
                    raise BackendUnavailable("still in fail-open mode")
                _recover()
            decision = backend().admit(
                quotas=quotas,
                request_id=request_id,
                version=_state.version,
                epoch=_state.epoch,
                est_tokens=est_tokens,
                est_cost=est_cost,
                mode=mode,
                now=moment,
            )
        except StalePolicy as exc:
            _on_stale(exc)
            continue
        except RebuildNeeded as exc:
            counters_rebuild(quotas=exc.quotas, now=moment)
            continue
        except BackendUnavailable as exc:
            decision = _admit_degraded(
                policy=policy,
                quotas=quotas,
                request_id=request_id,
                est_tokens=est_tokens,
                est_cost=est_cost,
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens,
                mode=mode,
                now=moment,
                reason=str(exc),
            )
        if not decision.admitted:
            raise _refuse(decision, policy)
        metrics.QUOTA_DECISIONS.labels("admitted", "", "").inc()
        return Admission(
            request_id=request_id,
            policy=policy,
            priority=priority,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            est_tokens=est_tokens,
            est_cost=est_cost,
            windows=decision.windows,
            backend=decision.backend,
            cached=mode == "hit",
        )
    raise QuotaUnavailable("The quota policy kept changing during admission; try again.")


def admission_admit(
    *,
    user_id: int,
    key_id: int | None,
    model: str,
    request_id: str,
    prompt_tokens: int,
    max_tokens: int,
    priority: str = "high",
    now: float | None = None,
) -> Admission:
    """Admit one generation request or refuse it, consuming nothing when refused.

    Reserves a request, `prompt_tokens + max_tokens` tokens, their cost at the model's
    prices (micro-USD, rounded half-up) and a concurrency lease in every scope that applies.
    Raises QuotaExceeded (429), QuotaUnavailable (503, fail-closed) and the policy errors.
    """
    return _admit(
        user_id=user_id,
        key_id=key_id,
        model=model,
        request_id=request_id,
        priority=priority,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        mode="full",
        now=now,
    )


def admission_count_hit(
    *,
    user_id: int,
    key_id: int | None,
    model: str,
    request_id: str,
    priority: str = "high",
    now: float | None = None,
) -> Admission:
    """Count a cache hit against the request windows only (it costs no tokens or money)."""
    return _admit(
        user_id=user_id,
        key_id=key_id,
        model=model,
        request_id=request_id,
        priority=priority,
        prompt_tokens=0,
        max_tokens=0,
        mode="hit",
        now=now,
    )


# --- fail-open ---------------------------------------------------------------------------


def _admit_degraded(
    *,
    policy: Policy,
    quotas: tuple[Quota, ...],
    request_id: str,
    est_tokens: int,
    est_cost: int,
    prompt_tokens: int,
    max_tokens: int,
    mode: str,
    now: float,
    reason: str,
) -> Decision:
    if _state.degraded_since is None:
        logger.warning(
            "quota backend unavailable (%s): QUOTA_FAIL_MODE=%s", reason, settings.QUOTA_FAIL_MODE
        )
    _state.degraded_since = _state.degraded_since or time.monotonic()
    _state.next_redis_try = time.monotonic() + 1.0
    metrics.QUOTA_BACKEND_FALLBACKS.labels(settings.QUOTA_FAIL_MODE).inc()
    if settings.QUOTA_FAIL_MODE == "closed":
        raise QuotaUnavailable()

    workers = max(1, settings.QUOTA_WORKER_COUNT)
    local = tuple(
        Quota(q.scope, q.dimension, q.limit // workers, q.counter)
        for q in quotas
        if q.window not in ("day", "month") and q.kind in ("r", "l")
    )
    ledgered = tuple(q for q in quotas if q.window in ("day", "month") or q.kind == "t")
    fallback = _state.fallback
    version, epoch = fallback.tokens()
    decision = fallback.admit(
        quotas=local,
        request_id=request_id,
        version=version,
        epoch=epoch,
        est_tokens=est_tokens,
        est_cost=est_cost,
        mode=mode,
        now=now,
    )
    decision.backend = "degraded"
    if not decision.admitted:
        return decision
    ledger_decision = _ledger_admit(
        policy=policy,
        quotas=ledgered,
        request_id=request_id,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        est_tokens=est_tokens,
        est_cost=est_cost,
        mode=mode,
        now=now,
    )
    if not ledger_decision.admitted:
        fallback.settle(request_id=request_id, tokens=0, cost=0, refund=True)
        ledger_decision.windows = decision.windows + ledger_decision.windows
        ledger_decision.backend = "degraded"
        return ledger_decision
    decision.windows += ledger_decision.windows
    return decision


def _recover() -> None:
    """Try Redis again after a fail-open period; raises BackendUnavailable if still down.

    The counter epoch is rotated first, so day and month counters are rebuilt from the
    ledger, which holds what every worker spent while Redis was away.
    """
    _state.next_redis_try = time.monotonic() + 1.0
    backend().rotate_epoch()
    logger.warning("quota backend reachable again: counter epoch rotated")
    _state.degraded_since = None


def _ledger_filter(counter: str) -> Q:
    kind, _, rest = counter.partition(":")
    if kind == "u":
        return Q(user_id=int(rest))
    if kind == "k":
        return Q(api_key_id=int(rest))
    if kind == "p":
        provider, _, model = rest.partition(":")
        return Q(provider=provider) if model == "*" else Q(provider=provider, model=model)
    return Q()


def _window_start(quota: Quota, now: float) -> datetime:
    day_start, _, month_start, _ = calendar_bounds(now)
    if quota.window == "day":
        return day_start
    if quota.window == "month":
        return month_start
    return datetime.fromtimestamp(now - int(quota.window), tz=UTC)


def ledger_usage(*, counter: str, since: datetime) -> tuple[int, int, int]:
    """(requests, tokens, micro-USD) the ledger holds for a principal since `since`."""
    row = (
        UsageRecord.objects.filter(_ledger_filter(counter), created_at__gte=since)
        .filter(outcome__in=COUNTED_OUTCOMES)
        .aggregate(
            requests=Count("id"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            cost=Sum("cost_usd"),
        )
    )
    tokens = int(row["prompt"] or 0) + int(row["completion"] or 0)
    return int(row["requests"]), tokens, usd_to_micros(row["cost"] or Decimal(0))


def _ledger_admit(
    *,
    policy: Policy,
    quotas: tuple[Quota, ...],
    request_id: str,
    prompt_tokens: int,
    max_tokens: int,
    est_tokens: int,
    est_cost: int,
    mode: str,
    now: float,
) -> Decision:
    """Check budgets against the ledger and write a pending row, one principal at a time."""
    amounts = {"r": 1, "t": est_tokens, "c": est_cost}
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                for counter in sorted({q.counter for q in quotas}):
                    cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"tg:{counter}"])
        states: list[WindowState] = []
        worst: WindowState | None = None
        worst_wait = -1.0
        for quota in quotas:
            used = ledger_usage(counter=quota.counter, since=_window_start(quota, now))
            value = {"r": used[0], "t": used[1], "c": used[2]}[quota.kind]
            _, day_end, _, month_end = calendar_bounds(now)
            end = {"day": day_end.timestamp(), "month": month_end.timestamp()}.get(
                str(quota.window), now + 1
            )
            state = WindowState(quota, value, end - now)
            states.append(state)
            if value + amounts[quota.kind] > quota.limit and state.reset_in > worst_wait:
                worst, worst_wait = state, state.reset_in
        if worst is not None:
            return Decision(False, states, worst, worst_wait, backend="degraded")
        UsageRecord.objects.create(
            request_id=request_id,
            user_id=policy.user_id,
            api_key_id=policy.key_id,
            model=policy.model,
            provider=policy.provider,
            prompt_tokens=0 if mode == "hit" else prompt_tokens,
            completion_tokens=0 if mode == "hit" else max_tokens,
            cost_usd=micros_to_usd(est_cost),
            cached=mode == "hit",
            outcome=Outcome.CACHED if mode == "hit" else Outcome.PENDING,
        )
    return Decision(
        True,
        [
            WindowState(q, s.used + amounts[q.kind], s.reset_in)
            for q, s in zip(quotas, states, strict=True)
        ],
        backend="degraded",
    )


# --- settlement --------------------------------------------------------------------------


def _latency(admission: Admission, latency_ms: int | None) -> int:
    if latency_ms is not None:
        return max(0, int(latency_ms))
    return int((time.monotonic() - admission.started) * 1000)


def _settle_counters(*, admission: Admission, tokens: int, cost: int, refund: bool) -> None:
    if admission.backend == "degraded":
        _state.fallback.settle(
            request_id=admission.request_id, tokens=tokens, cost=cost, refund=refund
        )
        return
    try:
        backend().settle(request_id=admission.request_id, tokens=tokens, cost=cost, refund=refund)
    except BackendUnavailable:
        # The reservation stays until its lease expires and the sweep refunds it; the
        # ledger is the truth the next counter epoch rebuilds from.
        logger.warning("settlement of %s deferred: quota backend unavailable", admission.request_id)


def usage_settle(
    *,
    admission: Admission,
    prompt_tokens: int,
    completion_tokens: int,
    latency_ms: int | None = None,
    cached: bool = False,
    fallback: bool = False,
) -> Decimal:
    """Replace the reservation by the actual usage and write the ledger row; idempotent.

    Returns the cost in USD (Decimal, to the micro-dollar). `cached=True` with zero tokens
    settles a request answered by another one (single flight): it counts as a request and
    costs nothing.
    """
    policy = admission.policy
    cost = policy.cost_of(prompt_tokens, completion_tokens)
    micros = usd_to_micros(cost)
    tokens = prompt_tokens + completion_tokens
    _settle_counters(admission=admission, tokens=tokens, cost=micros, refund=False)
    _ledger_write(
        admission=admission,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost=cost,
        outcome=Outcome.CACHED if cached else Outcome.OK,
        cached=cached,
        fallback=fallback,
        latency_ms=_latency(admission, latency_ms),
    )
    if tokens:
        metrics.TOKENS.labels(policy.model, "prompt").inc(prompt_tokens)
        metrics.TOKENS.labels(policy.model, "completion").inc(completion_tokens)
    if cost:
        metrics.COST_USD.labels(policy.model).inc(float(cost))
    return cost


def usage_refund(*, admission: Admission, outcome: str, latency_ms: int | None = None) -> None:
    """A failed upstream call: everything reserved is given back; the ledger row has no cost."""
    _settle_counters(admission=admission, tokens=0, cost=0, refund=True)
    _ledger_write(
        admission=admission,
        prompt_tokens=0,
        completion_tokens=0,
        cost=Decimal(0),
        outcome=outcome,
        cached=False,
        fallback=False,
        latency_ms=_latency(admission, latency_ms),
    )


def _ledger_write(
    *,
    admission: Admission,
    prompt_tokens: int,
    completion_tokens: int,
    cost: Decimal,
    outcome: str,
    cached: bool,
    fallback: bool,
    latency_ms: int,
) -> None:
    policy = admission.policy
    if admission.backend == "degraded":
        UsageRecord.objects.filter(request_id=admission.request_id).update(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            outcome=outcome,
            cached=cached,
            fallback=fallback,
            latency_ms=latency_ms,
        )
        return
    _ledger_insert(
        UsageRecord(
            request_id=admission.request_id,
            user_id=policy.user_id,
            api_key_id=policy.key_id,
            model=policy.model,
            provider=policy.provider,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            cached=cached,
            fallback=fallback,
            outcome=outcome,
            latency_ms=latency_ms,
        )
    )


@functools.cache
def _ledger_insert_sql(vendor: str) -> tuple[str, tuple[Any, ...]]:
    fields = tuple(f for f in UsageRecord._meta.concrete_fields if not f.primary_key)
    quote = connection.ops.quote_name
    columns = ", ".join(quote(str(f.column)) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    # Names from the model's meta, quoted; the values are parameters.
    table = quote(UsageRecord._meta.db_table)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"  # noqa: S608
    return sql, fields


def _ledger_insert(row: UsageRecord) -> None:
    """INSERT one ledger row unless its request id is already there. One statement, so one
    round trip in autocommit mode, where bulk_create(ignore_conflicts=True) adds a BEGIN
    and a COMMIT around it; the SQL is built once from the model."""
    sql, fields = _ledger_insert_sql(connection.vendor)
    params = [f.get_db_prep_save(f.pre_save(row, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


# --- cache-hit ledger rows (batched) -----------------------------------------------------

_hit_queue: queue.SimpleQueue[UsageRecord] = queue.SimpleQueue()
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def usage_flush() -> int:
    """Write the queued cache-hit rows now (one bulk INSERT); the number written."""
    rows: list[UsageRecord] = []
    while True:
        try:
            rows.append(_hit_queue.get_nowait())
        except queue.Empty:
            break
    if rows:
        UsageRecord.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
    return len(rows)


def _flush_forever(interval: float) -> None:
    from django.db import close_old_connections

    while True:
        time.sleep(interval)
        try:
            usage_flush()
        except Exception:
            logger.exception("cache-hit ledger flush failed")
        finally:
            close_old_connections()


def _enqueue(row: UsageRecord) -> None:
    global _flusher  # noqa: PLW0603
    interval = float(getattr(settings, "USAGE_HIT_BATCH_SECONDS", 1.0))
    if interval <= 0:
        _ledger_insert(row)
        return
    _hit_queue.put(row)
    if _flusher is None or not _flusher.is_alive():
        with _flusher_lock:
            if _flusher is None or not _flusher.is_alive():
                _flusher = threading.Thread(
                    target=_flush_forever, args=(interval,), name="usage-flush", daemon=True
                )
                _flusher.start()


atexit.register(lambda: usage_flush() if not _hit_queue.empty() else None)


def usage_record_hit(
    *, admission: Admission, latency_ms: int | None = None, fallback: bool = False
) -> None:
    """The ledger row of a cache hit (no tokens, no money), written at most a second late."""
    policy = admission.policy
    if admission.backend == "degraded":
        UsageRecord.objects.filter(request_id=admission.request_id).update(
            latency_ms=_latency(admission, latency_ms), fallback=fallback
        )
        return
    _enqueue(
        UsageRecord(
            request_id=admission.request_id,
            user_id=policy.user_id,
            api_key_id=policy.key_id,
            model=policy.model,
            provider=policy.provider,
            cached=True,
            fallback=fallback,
            outcome=Outcome.CACHED,
            latency_ms=_latency(admission, latency_ms),
        )
    )


def usage_record_fallback(
    *, policy: Policy, user_id: int, key_id: int | None, request_id: str, latency_ms: int
) -> None:
    """The ledger row of a stale answer served because a quota was exhausted."""
    metrics.STALE_FALLBACKS.inc()
    _enqueue(
        UsageRecord(
            request_id=request_id,
            user_id=user_id,
            api_key_id=key_id,
            model=policy.model,
            provider=policy.provider,
            cached=True,
            fallback=True,
            outcome=Outcome.CACHED,
            latency_ms=max(0, latency_ms),
        )
    )


# --- counters ------------------------------------------------------------------------------


def counters_rebuild(*, quotas: Iterable[Quota], now: float | None = None) -> int:
    """Recreate missing day/month counters of these quotas from the ledger.

    Returns how many counters were created (0 when another worker was first).
    """
    moment = time.time() if now is None else now
    _, day_end, _, month_end = calendar_bounds(moment)
    entries: dict[str, tuple[str, int, int, int, int]] = {}
    be = backend()
    for quota in quotas:
        if quota.window not in ("day", "month"):
            continue
        key = be.counter_key(quota, _state.epoch, moment)
        if key in entries:
            continue
        requests, tokens, micros = ledger_usage(
            counter=quota.counter, since=_window_start(quota, moment)
        )
        end = day_end if quota.window == "day" else month_end
        ttl = int(end.timestamp() - moment) + 3600
        entries[key] = (key, requests, tokens, micros, ttl)
    if not entries:
        return 0
    created = be.init_calendar(list(entries.values()))
    if created:
        logger.info("rebuilt %d calendar counters from the ledger", created)
    return created


def counters_rebuild_all() -> None:
    """Make every day and month counter rebuild from the ledger before its next use."""
    backend().rotate_epoch()


def reservations_sweep(*, now: float | None = None) -> int:
    """Refund reservations abandoned by crashed workers (their lease expired)."""
    moment = time.time() if now is None else now
    return backend().sweep(now=moment)


def quota_reset_windows(*, user_id: int) -> int:
    """Clear a user's current windows (sliding, calendar, leases) and those of their keys.

    Calendar counters rebuild from the ledger on the next request, so this forgives the
    minute and hour windows and any in-flight leases; day and month budgets stay true.
    """
    deleted = backend().reset_counters(counter=f"u:{user_id}")
    for key_id in ApiKey.objects.filter(user_id=user_id).values_list("id", flat=True):
        deleted += backend().reset_counters(counter=f"k:{key_id}")
    return deleted


def denials_persist(*, day: date | None = None) -> int:
    """Copy the day's live refusal counts from the quota backend into DenialCount."""
    day = day or timezone.now().date()
    counts = backend().denials(day=day.strftime("%Y%m%d"))
    for name, count in counts.items():
        scope, _, dimension = name.partition("|")
        DenialCount.objects.update_or_create(
            day=day, scope=scope, dimension=dimension, defaults={"count": count}
        )
    return len(counts)


# --- standing --------------------------------------------------------------------------------


def _standing_quotas(user_id: int, key_id: int | None) -> tuple[Policy | None, tuple[Quota, ...]]:
    model = settings.TOLLGATE_DEFAULT_MODEL
    try:
        policy = policy_get(user_id=user_id, key_id=key_id, model=model)
    except Exception:  # noqa: BLE001 - the default model may be missing; show scopes anyway
        policy = None
    if policy is None:
        return None, ()
    scopes = ("key", "user", "plan")
    return policy, tuple(q for q in policy.quotas if q.scope in scopes)


def _read(quotas: tuple[Quota, ...], now: float, *, from_ledger: bool = False) -> list[WindowState]:
    """The windows' standing from the backend; Redis unreachable: nothing used (headers),
    or (from_ledger) what fail-open enforces, see `_read_degraded`."""
    if not quotas:
        return []
    be = backend()
    try:
        if not _state.epoch:
            _state.version, _state.epoch = be.tokens()
        return be.read(quotas=quotas, epoch=_state.epoch, now=now)
    except BackendUnavailable:
        if from_ledger:
            return _read_degraded(quotas, now)
        return [WindowState(q, 0, 0) for q in quotas]


def _read_degraded(quotas: tuple[Quota, ...], now: float) -> list[WindowState]:
    """Redis unreachable: the standing fail-open enforces. Token and cost budgets and the
    calendar request windows come from the ledger (one aggregate per principal and window,
    so a GET /api/v1/quota during an outage never claims an untouched budget); minute and
    hour request windows and concurrency from this worker's limiter, at its share."""
    workers = max(1, settings.QUOTA_WORKER_COUNT)
    day_left, month_left = seconds_left(now)
    ledger: dict[tuple[str, str | int], tuple[int, int, int]] = {}
    local: list[Quota] = []
    states: dict[int, WindowState] = {}
    for i, q in enumerate(quotas):
        if q.window not in ("day", "month") and q.kind in ("r", "l"):
            local.append(Quota(q.scope, q.dimension, q.limit // workers, q.counter))
            continue
        spot = (q.counter, q.window)
        if spot not in ledger:
            ledger[spot] = ledger_usage(counter=q.counter, since=_window_start(q, now))
        requests, tokens, micros = ledger[spot]
        used = {"r": requests, "t": tokens, "c": micros}[q.kind]
        reset = day_left if q.window == "day" else month_left if q.window == "month" else 0
        states[i] = WindowState(q, used, reset)
    fallback = _state.fallback
    local_states = iter(fallback.read(quotas=tuple(local), epoch=fallback.tokens()[1], now=now))
    return [states[i] if i in states else next(local_states) for i in range(len(quotas))]


def quota_headers(*, user_id: int, key_id: int | None, now: float | None = None) -> dict[str, str]:
    """Rate-limit headers of the caller's current standing; consumes nothing."""
    _, quotas = _standing_quotas(user_id, key_id)
    return ratelimit_headers(_read(quotas, time.time() if now is None else now))


def _money(micros: int) -> str:
    """USD as a decimal string with at least cents: "5.00", "0.1234", "0.000055"."""
    value = micros_to_usd(micros).normalize()
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        value = value.quantize(Decimal("0.01"))
    return f"{value:f}"


def quota_standing(
    *, user_id: int, key_id: int | None = None, now: float | None = None
) -> dict[str, Any]:
    """API.md's GET /api/v1/quota body: each dimension's tightest limit, use and reset."""
    moment = time.time() if now is None else now
    policy, quotas = _standing_quotas(user_id, key_id)
    states = _read(quotas, moment, from_ledger=True)
    limits: dict[str, dict[str, Any]] = {}
    for dim in DIMENSIONS:
        dim_states = [s for s in states if s.quota.dimension == dim]
        tight = min(dim_states, key=lambda s: s.remaining) if dim_states else None
        money = dim.startswith("cost")
        if tight is None:
            entry: dict[str, Any] = {"limit": None, "used": "0" if money else 0, "remaining": None}
        elif money:
            entry = {
                "limit": _money(tight.quota.limit),
                "used": _money(tight.used),
                "remaining": _money(tight.remaining),
            }
        else:
            entry = {"limit": tight.quota.limit, "used": tight.used, "remaining": tight.remaining}
        if dim != "concurrency":
            entry["reset_in"] = math.ceil(tight.reset_in) if tight else 0
        limits[dim] = entry
    username = policy.username if policy else ""
    if policy is None:
        from django.contrib.auth import get_user_model

        user = get_user_model().objects.filter(pk=user_id).first()
        username = user.get_username() if user else ""
    prefix = (
        ApiKey.objects.filter(pk=key_id).values_list("prefix", flat=True).first()
        if key_id
        else None
    )
    return {
        "user": username,
        "key": f"tg_{prefix}" if prefix else None,
        "plan": policy.plan if policy else None,
        "limits": limits,
    }


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
    """Record that a key was used; at most one write a minute per key and process."""
    now = time.monotonic()
    if now - _last_touch.get(key_id, -1e9) < 60:
        return
    _last_touch[key_id] = now
    moment = timezone.now()
    if last_used_at is not None and (moment - last_used_at).total_seconds() < 60:
        return
    ApiKey.objects.filter(pk=key_id).update(last_used_at=moment)


def new_request_id() -> str:
    return uuid.uuid4().hex


def quota_global(*, now: float | None = None) -> dict[str, Any]:
    """Staff view of the shared scopes: global and provider limits with their use, today's
    refusals by reason, the priority shares and the upstream circuits."""
    from quotas.models import GlobalLimits, ProviderQuota
    from quotas.policy import global_quotas, provider_quotas

    moment = time.time() if now is None else now
    glob = GlobalLimits.load()
    quotas = global_quotas(glob)
    for row in ProviderQuota.objects.all():
        quotas += provider_quotas(row)
    states = _read(tuple(quotas), moment)

    def entry(state: WindowState) -> dict[str, Any]:
        money = state.quota.kind == "c"
        fmt = _money if money else (lambda v: v)
        metrics.QUOTA_REMAINING.labels(state.quota.scope, state.quota.dimension).set(
            state.remaining
        )
        return {
            "limit": fmt(state.quota.limit),
            "used": fmt(state.used),
            "remaining": fmt(state.remaining),
            "reset_in": math.ceil(state.reset_in),
        }

    providers: dict[str, dict[str, Any]] = {}
    for state in states:
        if state.quota.scope == "provider":
            name = state.quota.counter.removeprefix("p:")
            providers.setdefault(name, {})[state.quota.dimension] = entry(state)
    day = datetime.fromtimestamp(moment, tz=UTC).strftime("%Y%m%d")
    try:
        denials = backend().denials(day=day)
    except BackendUnavailable:
        denials = {}
    try:
        from generation.services import circuit_states

        circuits = circuit_states()
    except Exception:  # noqa: BLE001 - the breaker lives in another app; report without it
        circuits = []
    return {
        "global": {s.quota.dimension: entry(s) for s in states if s.quota.scope == "global"},
        "providers": providers,
        "denials_today": [
            {"scope": k.partition("|")[0], "dimension": k.partition("|")[2], "count": v}
            for k, v in sorted(denials.items())
        ],
        "priority_shares": {
            "critical": "1.00",
            "high": str(glob.high_share),
            "medium": str(glob.medium_share),
            "low": str(glob.low_share),
        },
        "circuits": circuits,
        "backend": {
            "name": backend().name,
            "degraded": _state.degraded_since is not None,
            "fail_mode": settings.QUOTA_FAIL_MODE,
        },
    }

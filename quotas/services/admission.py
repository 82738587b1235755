"""Admission: one atomic call that checks every window of every scope and reserves, or
refuses consuming nothing; and its fail-open path when Redis is unreachable."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.conf import settings
from django.db import DatabaseError, connection, transaction

from health import metrics
from quotas.engine import (
    BackendAway,
    BackendUnavailable,
    CacheGate,
    Decision,
    RebuildNeeded,
    StalePolicy,
    WindowState,
    calendar_bounds,
)
from quotas.errors import QuotaExceeded, QuotaUnavailable
from quotas.models import Outcome, UsageRecord
from quotas.policy import PRIORITIES, Policy, Quota, micros_to_usd, usd_to_micros
from quotas.services.counters import counters_rebuild
from quotas.services.ledger import _window_start, ledger_usages_failopen
from quotas.services.state import (
    _on_stale,
    _state,
    backend,
    deferred_settle,
    logger,
    policy_bump,
    policy_get,
)

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
    """The window of `kind` with the least left; of several with nothing left, the one
    that frees up last, since no request passes before it does; else the shortest."""
    candidates = [w for w in windows if w.quota.kind == kind]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda w: (
            w.remaining,
            -_reset_seconds(w) if w.remaining == 0 else _WINDOW_SECONDS.get(w.quota.window, 0),
        ),
    )


def _duration(seconds: int) -> str:
    """Whole seconds as OpenAI writes its reset headers (Go's durations): "17s", "6m0s",
    "8h19m18s"."""
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{seconds}s"


def _reset_seconds(state: WindowState) -> int:
    """Whole seconds until the window frees up. A full window with nothing in it to leave
    (a limit of 0) frees up no sooner than a refusal's Retry-After says: its length, not
    "0s", which would have a client ask again at once."""
    if state.reset_in <= 0 and state.remaining == 0 and isinstance(state.quota.window, int):
        return state.quota.window
    return max(0, math.ceil(state.reset_in))


def ratelimit_headers(windows: Iterable[WindowState]) -> dict[str, str]:
    """API.md's rate-limit headers for the tightest request window and token window."""
    windows = list(windows)
    headers: dict[str, str] = {}
    req = _tightest(windows, "r")
    if req is not None:
        name = _POLICY_NAMES.get((req.quota.kind, req.quota.window), "requests")
        reset = _reset_seconds(req)
        window = _WINDOW_SECONDS.get(req.quota.window, 60)
        headers["RateLimit-Policy"] = f'"{name}";q={req.quota.limit};w={window}'
        headers["RateLimit"] = f'"{name}";r={req.remaining};t={reset}'
        headers["X-RateLimit-Limit-Requests"] = str(req.quota.limit)
        headers["X-RateLimit-Remaining-Requests"] = str(req.remaining)
        headers["X-RateLimit-Reset-Requests"] = _duration(reset)
    tok = _tightest(windows, "t")
    if tok is not None:
        headers["X-RateLimit-Limit-Tokens"] = str(tok.quota.limit)
        headers["X-RateLimit-Remaining-Tokens"] = str(tok.remaining)
        headers["X-RateLimit-Reset-Tokens"] = _duration(_reset_seconds(tok))
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
    # Admission time (the engine's `now`): the ledger row's date, so that a request counts
    # in the ledger in the very day and month its reservation counted in, however late it
    # settles (a request admitted at 23:59:59 and settled after midnight is yesterday's).
    at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    # With a CacheGate: the entry the script found (fresh when `cached`, else a stale copy
    # or None) and whether it took the single-flight lock.
    entry: bytes | None = None
    locked: bool = False
    # Once settled (or refunded): the tokens it used, which replaced the reservation.
    settled_tokens: int | None = None

    def headers(self) -> dict[str, str]:
        """The rate-limit headers as the admission left the windows; once settled, its
        token windows hold the tokens used instead of the reservation."""
        windows = self.windows
        if self.settled_tokens is not None and self.est_tokens:
            given_back = self.est_tokens - self.settled_tokens
            windows = [
                WindowState(w.quota, max(0, w.used - given_back), w.reset_in)
                if w.quota.kind == "t"
                else w
                for w in windows
            ]
        return ratelimit_headers(windows)


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
    # The refusing window frees up for this request when Retry-After says, which may be
    # later than its oldest use leaving it (a limit lowered below what it holds).
    exc.headers = ratelimit_headers(
        WindowState(w.quota, w.used, max(w.reset_in, decision.retry_after)) if w is denied else w
        for w in decision.windows
    )
    exc.policy = policy  # lets the caller serve a stale answer
    exc.looked_up, exc.entry = decision.looked_up, decision.entry  # ... a CacheGate's look-up
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
    gate: CacheGate | None = None,
) -> Admission:
    if priority not in PRIORITIES:
        priority = "high"
    moment = time.time() if now is None else now
    # Each pass that does not decide has brought this process up to date (a policy saved,
    # an epoch rotated: a stale reply, then a rebuild). Workers back from a Redis outage
    # each rotate the epoch once, so a request may meet several rotations in a row.
    for _ in range(10):
        policy = policy_get(user_id=user_id, key_id=key_id, model=model)
        quotas = policy.quotas_for(priority)
        if mode == "hit":  # counted as a request; its token windows only read (headers)
            quotas = tuple(q for q in quotas if q.kind in ("r", "t"))
            est_tokens, est_cost = 0, 0
        else:
            est_tokens = prompt_tokens + max_tokens
            est_cost = usd_to_micros(policy.cost_of(prompt_tokens, max_tokens))
        try:
            if _state.degraded_since is not None:
                if time.monotonic() < _state.next_redis_try:
                    raise BackendUnavailable("still in fail-open mode")
                if backend().away():  # its check has not found Redis back yet
                    raise BackendAway("still in fail-open mode: Redis is left alone")
                _recover()
            if _state.bump_pending:
                policy_bump()  # stays pending if Redis still does not take it
            if _state.deferred:
                deferred_settle()
            decision = backend().admit(
                quotas=quotas,
                request_id=request_id,
                version=_state.version,
                epoch=_state.epoch,
                est_tokens=est_tokens,
                est_cost=est_cost,
                mode=mode,
                now=moment,
                gate=gate,
            )
        except StalePolicy as exc:
            _on_stale(exc)
            continue
        except RebuildNeeded as exc:
            with contextlib.suppress(BackendUnavailable):  # if so, the next pass degrades
                counters_rebuild(quotas=exc.quotas, now=moment)
            continue
        except BackendUnavailable as exc:
            try:
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
                    away=isinstance(exc, BackendAway),
                )
            except _RedisBack:
                continue  # admitted through Redis instead
        if not decision.admitted:
            raise _refuse(decision, policy)
        metrics.series(metrics.QUOTA_DECISIONS, "admitted", "", "").inc()
        hit = mode == "hit" or decision.hit
        return Admission(
            request_id=request_id,
            policy=policy,
            priority=priority,
            prompt_tokens=0 if hit else prompt_tokens,
            max_tokens=0 if hit else max_tokens,
            est_tokens=0 if hit else est_tokens,
            est_cost=0 if hit else est_cost,
            windows=decision.windows,
            backend=decision.backend,
            cached=hit,
            at=moment,
            entry=decision.entry,
            locked=decision.locked,
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
    gate: CacheGate | None = None,
) -> Admission:
    """Admit one generation request or refuse it, consuming nothing when refused.

    Reserves a request, `prompt_tokens + max_tokens` tokens, their cost at the model's
    prices (micro-USD, rounded half-up) and a concurrency lease in every scope that applies.
    Raises QuotaExceeded (429), QuotaUnavailable (503, fail-closed) and the policy errors.

    `gate`: the cache look-up of this request, in the same round trip. If the script finds
    a fresh answer, the request is only counted as a cache hit (`cached=True`, nothing
    reserved, `entry` holds the answer; the caller writes its ledger row with
    `usage_record_hit`); else it is admitted in full and takes the single-flight lock
    (`locked`). Without Redis (in-process or fail-open) the gate is not looked at.
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
        gate=gate,
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
    away: bool = False,
) -> Decision:
    """`away`: Redis did not answer, or is left alone (BackendAway): not this engine's
    back-off but its server's Outage decides when it is tried again, so that every part of
    the worker goes back to it together, once the check has found it back."""
    if _state.degraded_since is None:  # Redis has just failed: tried again in a second
        with _state.lock:  # the requests in flight when Redis hangs all fail at once
            first = _state.degraded_since is None
            if first:
                _state.degraded_since = time.monotonic()
                _state.next_redis_try = time.monotonic() + 1.0
        if first:
            logger.warning(
                "quota backend unavailable (%s): QUOTA_FAIL_MODE=%s",
                reason,
                settings.QUOTA_FAIL_MODE,
            )
    # Otherwise the next try stays where `_recover` put it: pushed back by every request
    # served meanwhile, it would never come while requests are a second apart or less.
    if away:
        _state.next_redis_try = 0.0
    metrics.QUOTA_BACKEND_FALLBACKS.labels(settings.QUOTA_FAIL_MODE).inc()
    if settings.QUOTA_FAIL_MODE == "closed":
        raise QuotaUnavailable()
    if mode == "hit":  # a hit's token windows are only read, and there is no Redis to read
        quotas = tuple(q for q in quotas if q.kind == "r")

    # Each worker holds its share of a request or concurrency limit, rounded up: a limit
    # smaller than the number of workers still lets each one through, at the price of
    # admitting up to QUOTA_WORKER_COUNT - 1 more than the limit across them (0 stays 0).
    workers = max(1, settings.QUOTA_WORKER_COUNT)
    local = tuple(
        Quota(q.scope, q.dimension, -(-q.limit // workers), q.counter)
        for q in quotas
        if q.window not in ("day", "month") and q.kind in ("r", "l")
    )
    ledgered = tuple(q for q in quotas if q.window in ("day", "month") or q.kind == "t")
    fallback = _state.fallback
    version, epoch = fallback.tokens()
    # A hit is admitted here as a reservation of nothing but its request, so that a refusal
    # by the ledger below can give its count back; it is settled as soon as both agree.
    decision = fallback.admit(
        quotas=local,
        request_id=request_id,
        version=version,
        epoch=epoch,
        est_tokens=est_tokens,
        est_cost=est_cost,
        mode="full",
        now=now,
    )
    decision.backend = "degraded"
    if not decision.admitted:
        return decision
    try:
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
    except BaseException as exc:  # the request is not admitted after all
        fallback.settle(request_id=request_id, tokens=0, cost=0, refund=True)
        if isinstance(exc, DatabaseError):  # neither Redis nor the ledger can count it
            raise QuotaUnavailable() from exc
        raise
    if not ledger_decision.admitted:
        fallback.settle(request_id=request_id, tokens=0, cost=0, refund=True)
        ledger_decision.windows = decision.windows + ledger_decision.windows
        ledger_decision.backend = "degraded"
        return ledger_decision
    if mode == "hit":  # counted for good: a hit has nothing else to settle
        fallback.settle(request_id=request_id, tokens=0, cost=0, refund=False)
    decision.windows += ledger_decision.windows
    return decision


class _RedisBack(Exception):  # noqa: N818 - a signal, not an error
    """This worker found Redis again while a fail-open admission waited for its ledger
    locks: the counters may have been rebuilt from the ledger meanwhile, without the row it
    would write, so it goes through Redis instead."""


def _recover() -> None:
    """Try Redis again after a fail-open period; raises BackendUnavailable if still down.

    The counter epoch is rotated first, so day and month counters are rebuilt from the
    ledger, which holds what every worker spent while Redis was away. Also when the outage
    ended without the engine (its server's check, or another part's call, found Redis
    back): the engine's first call to Redis after its fail-open period is always this one.
    """
    _state.next_redis_try = time.monotonic() + 1.0
    backend().rotate_epoch()
    # Governance may have changed while workers could not hear of it through Redis.
    backend().bump_version()
    logger.warning("quota backend reachable again: counter epoch rotated, policies reloaded")
    _state.degraded_since = None


def _broad(counter: str) -> bool:
    """A scope of everyone's rows (global) or of a provider's: the reads that every
    fail-open admission waits for, whose older rows are worth keeping summed."""
    return counter == "g" or counter.startswith("p:")


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
        if _state.degraded_since is None:
            raise _RedisBack()
        states: list[WindowState] = []
        worst: WindowState | None = None
        worst_wait = -1.0
        spots = [(quota.counter, _window_start(quota, now)) for quota in quotas]
        usages = ledger_usages_failopen(
            spots,
            calendar=[
                spot
                for quota, spot in zip(quotas, spots, strict=True)
                if quota.window in ("day", "month") and _broad(quota.counter)
            ],
            now=now,
        )
        _, day_end, _, month_end = calendar_bounds(now)
        for quota, spot in zip(quotas, spots, strict=True):
            used = usages[spot]
            value = {"r": used[0], "t": used[1], "c": used[2]}[quota.kind]
            end = {"day": day_end.timestamp(), "month": month_end.timestamp()}.get(
                str(quota.window), now + 1
            )
            state = WindowState(quota, value, end - now)
            states.append(state)
            over = value + amounts[quota.kind] > quota.limit or quota.limit <= 0
            if over and state.reset_in > worst_wait:
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
            created_at=datetime.fromtimestamp(now, tz=UTC),
        )
    return Decision(
        True,
        [
            WindowState(q, s.used + amounts[q.kind], s.reset_in)
            for q, s in zip(quotas, states, strict=True)
        ],
        backend="degraded",
    )

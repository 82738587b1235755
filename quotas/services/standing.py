"""A caller's standing and the shared scopes' use, read without consuming anything."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from health import metrics
from quotas.engine import (
    BackendUnavailable,
    RebuildNeeded,
    StalePolicy,
    WindowState,
    seconds_left,
)
from quotas.models import DIMENSIONS, ApiKey
from quotas.policy import Policy, Quota, micros_text
from quotas.services.admission import ratelimit_headers
from quotas.services.counters import counters_rebuild
from quotas.services.ledger import _window_start, ledger_usages
from quotas.services.state import _on_stale, _state, backend, policy_get

# --- standing --------------------------------------------------------------------------------


def _standing_quotas(user_id: int, key_id: int | None) -> tuple[Policy | None, tuple[Quota, ...]]:
    """The caller's policy without a model, and its own scopes' quotas (key, user, plan);
    (None, ()) for a caller whose policy cannot be resolved (inactive, suspended...)."""
    try:
        policy = policy_get(user_id=user_id, key_id=key_id, model=None)
    except Exception:  # noqa: BLE001 - a refused caller: its error response goes out as it is
        policy = None
    if policy is None:
        return None, ()
    scopes = ("key", "user", "plan")
    return policy, tuple(q for q in policy.quotas if q.scope in scopes)


def _read_live(
    quotas: tuple[Quota, ...], now: float, *, check_empty: bool = False
) -> list[WindowState] | None:
    """The windows' standing from the backend, or None when it is unreachable. Calendar
    counters of a new epoch are rebuilt from the ledger first, as an admission would.
    Raises StalePolicy (this process's state already brought up to date) when the policy
    version or the epoch moved: the caller's quotas may have changed, resolve them again.

    No quotas: nothing to read, and no round trip unless `check_empty`, which still
    compares the policy version (the standing of a caller with no limit of its own, whose
    cached policy would otherwise never hear of a limit an operator gives it)."""
    if not quotas and not check_empty:
        return []
    be = backend()
    try:
        if not quotas:
            version, epoch = be.tokens()
            if (version, epoch) != (_state.version, _state.epoch):
                stale = StalePolicy(version, epoch)
                _on_stale(stale)
                raise stale
            return []
        if not _state.epoch:
            _state.version, _state.epoch = be.tokens()
        for _ in range(2):
            try:
                return be.read(quotas=quotas, version=_state.version, epoch=_state.epoch, now=now)
            except StalePolicy as exc:
                _on_stale(exc)
                raise
            except RebuildNeeded as exc:
                counters_rebuild(quotas=exc.quotas, now=now)
        return be.read(quotas=quotas, version=_state.version, epoch=_state.epoch, now=now)
    except (BackendUnavailable, RebuildNeeded):
        return None


def _read(quotas: tuple[Quota, ...], now: float, *, from_ledger: bool = False) -> list[WindowState]:
    """The windows' standing from the backend; Redis unreachable: nothing used (headers),
    or (from_ledger) what fail-open enforces, see `_read_degraded`."""
    # The standing body (from_ledger) checks the version even with no quotas to read; the
    # headers of every response do not spend a round trip on it (an admission checks it).
    states = _read_live(quotas, now, check_empty=from_ledger)
    if states is not None:
        return states
    if from_ledger:
        return _read_degraded(quotas, now)
    return [WindowState(q, 0, 0) for q in quotas]


def _standing(
    user_id: int, key_id: int | None, now: float, *, from_ledger: bool = False
) -> tuple[Policy | None, list[WindowState]]:
    """The caller's policy and its own windows' standing, under the current policy version
    (a limit an operator just changed shows at once, on every worker)."""
    for _ in range(3):
        policy, quotas = _standing_quotas(user_id, key_id)
        try:
            return policy, _read(quotas, now, from_ledger=from_ledger)
        except StalePolicy:
            continue
    # Policies changing faster than they can be read: what fail-open would enforce.
    return policy, _read_degraded(quotas, now) if from_ledger else [
        WindowState(q, 0, 0) for q in quotas
    ]


def _read_degraded(quotas: tuple[Quota, ...], now: float) -> list[WindowState]:
    """Redis unreachable: the standing fail-open enforces. Token and cost budgets and the
    calendar request windows come from the ledger (one statement for every principal and window,
    so a GET /api/v1/quota during an outage never claims an untouched budget); minute and
    hour request windows and concurrency from this worker's limiter, at its share."""
    workers = max(1, settings.QUOTA_WORKER_COUNT)
    day_left, month_left = seconds_left(now)
    local: list[Quota] = []
    ledgered: dict[int, tuple[str, datetime]] = {}
    for i, q in enumerate(quotas):
        if q.window not in ("day", "month") and q.kind in ("r", "l"):
            # Each worker's share, rounded up, as the fail-open limiter holds it.
            local.append(Quota(q.scope, q.dimension, -(-q.limit // workers), q.counter))
        else:
            ledgered[i] = (q.counter, _window_start(q, now))
    ledger = ledger_usages(ledgered.values())
    states: dict[int, WindowState] = {}
    for i, spot in ledgered.items():
        q = quotas[i]
        requests, tokens, micros = ledger[spot]
        used = {"r": requests, "t": tokens, "c": micros}[q.kind]
        reset = day_left if q.window == "day" else month_left if q.window == "month" else 0
        states[i] = WindowState(q, used, reset)
    fallback = _state.fallback
    version, epoch = fallback.tokens()
    local_states = iter(fallback.read(quotas=tuple(local), version=version, epoch=epoch, now=now))
    return [states[i] if i in states else next(local_states) for i in range(len(quotas))]


def quota_headers(*, user_id: int, key_id: int | None, now: float | None = None) -> dict[str, str]:
    """Rate-limit headers of the caller's current standing; consumes nothing."""
    _, states = _standing(user_id, key_id, time.time() if now is None else now)
    return ratelimit_headers(states)


def _limit_entry(state: WindowState) -> dict[str, Any]:
    """One limited dimension as API.md writes it: `limit`, `used` and `remaining` (USD as
    decimal strings for cost) and `reset_in`, whole seconds until the window frees up.
    Concurrency counts requests in flight and has no window: it has no `reset_in`."""
    limit, used, remaining = state.quota.limit, state.used, state.remaining
    entry: dict[str, Any] = (
        {
            "limit": micros_text(limit),
            "used": micros_text(used),
            "remaining": micros_text(remaining),
        }
        if state.quota.kind == "c"
        else {"limit": limit, "used": used, "remaining": remaining}
    )
    if state.quota.kind != "l":
        entry["reset_in"] = math.ceil(state.reset_in)
    return entry


def quota_standing(
    *, user_id: int, key_id: int | None = None, now: float | None = None
) -> dict[str, Any]:
    """API.md's GET /api/v1/quota body: each dimension's tightest limit, use and reset."""
    moment = time.time() if now is None else now
    policy, states = _standing(user_id, key_id, moment, from_ledger=True)
    limits: dict[str, dict[str, Any]] = {}
    for dim in DIMENSIONS:
        dim_states = [s for s in states if s.quota.dimension == dim]
        if dim_states:
            limits[dim] = _limit_entry(min(dim_states, key=lambda s: s.remaining))
    limits |= _unlimited_entries(user_id, [dim for dim in DIMENSIONS if dim not in limits], moment)
    limits = {dim: limits[dim] for dim in DIMENSIONS}
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
        "suspended": bool(policy and policy.suspended),
        "limits": limits,
    }


def _unlimited_entries(user_id: int, dims: list[str], now: float) -> dict[str, dict[str, Any]]:
    """Dimensions no scope of the caller limits: `limit` and `remaining` null, `used` what
    the user spent in that window by the ledger (one statement), `reset_in` the time to the
    end of a day or month (0 for a sliding window). Concurrency is not tracked unlimited."""
    quotas = {dim: Quota("user", dim, 0, f"u:{user_id}") for dim in dims if dim != "concurrency"}
    spots = {dim: (q.counter, _window_start(q, now)) for dim, q in quotas.items()}
    usages = ledger_usages(spots.values()) if spots else {}
    day_left, month_left = seconds_left(now)
    entries: dict[str, dict[str, Any]] = {}
    for dim in dims:
        entry: dict[str, Any] = {"limit": None, "used": 0, "remaining": None}
        if dim in quotas:
            q = quotas[dim]
            requests, tokens, micros = usages[spots[dim]]
            used = {"r": requests, "t": tokens, "c": micros}[q.kind]
            entry["used"] = micros_text(used) if q.kind == "c" else used
            reset = {"day": day_left, "month": month_left}.get(str(q.window), 0)
            entry["reset_in"] = math.ceil(reset)
        entries[dim] = entry
    return entries


# The headroom series this process has reported (tollgate_quota_remaining).
_headroom_shown: set[tuple[str, str, str, str]] = set()


def _headroom_of_removed_limits(shown: set[tuple[str, str, str, str]]) -> None:
    """A limit an operator removed has no headroom to report: its series reads +Inf (no
    limit) rather than the last value it had, which would keep an exhaustion alert firing.
    In gunicorn's multiprocess mode a series cannot be dropped from every worker's file,
    but the most recent value wins (`livemostrecent`)."""
    for labels in _headroom_shown - shown:
        metrics.QUOTA_REMAINING.labels(*labels).set(float("inf"))
    _headroom_shown.update(shown)


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
    for _ in range(3):
        try:
            live = _read_live(tuple(quotas), moment)
            break
        except StalePolicy:  # only the epoch matters here: these quotas come from the rows
            continue
    else:
        live = None
    states = live if live is not None else _read_degraded(tuple(quotas), moment)

    shown: set[tuple[str, str, str, str]] = set()

    def entry(state: WindowState) -> dict[str, Any]:
        if live is not None:  # the gauges show live counters only
            provider, _, model = state.quota.counter.removeprefix("p:").partition(":")
            if state.quota.scope != "provider":
                provider = model = ""
            labels = (state.quota.scope, state.quota.dimension, provider, model)
            metrics.QUOTA_REMAINING.labels(*labels).set(state.remaining)
            shown.add(labels)
        return _limit_entry(state)

    providers: dict[str, dict[str, Any]] = {}
    for state in states:
        if state.quota.scope == "provider":
            name = state.quota.counter.removeprefix("p:")
            providers.setdefault(name, {})[state.quota.dimension] = entry(state)
    if live is not None:
        _headroom_of_removed_limits(shown)
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
            "degraded": _state.degraded_since is not None or live is None,
            # False: Redis is unreachable and the figures above come from the ledger.
            "live": live is not None,
            "fail_mode": settings.QUOTA_FAIL_MODE,
        },
    }

"""The in-process quota backend: the Redis backend's semantics for one process.

It serves the embedded default (no REDIS_URL) and, with request limits divided by the
worker count, the fail-open limiter used while Redis is unreachable. Same windows, same
all-or-nothing reservation, same settlement rules; state lives in dicts behind one lock.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from config.redis_calls import ScriptCall, run_calls
from quotas.engine import CacheGate, Decision, RebuildNeeded, StalePolicy, WindowState, seconds_left
from quotas.errors import DuplicateRequest
from quotas.policy import Quota

SUB = 12


@dataclass(slots=True)
class _Calendar:
    gen: str
    r: int = 0
    t: int = 0
    c: int = 0
    expires: float = 0.0

    def get(self, kind: str) -> int:
        return int(getattr(self, kind))

    def add(self, kind: str, delta: int) -> None:
        setattr(self, kind, getattr(self, kind) + delta)


@dataclass(slots=True)
class _Reservation:
    tokens: int
    cost: int
    ops: list[tuple[str, str, str, str | None]] = field(
        default_factory=list
    )  # key, kind, field, gen
    deadline: float = 0.0
    swept: bool = False


class LocalQuotaBackend:
    name = "local"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = uuid.uuid4().hex
        self._epoch = uuid.uuid4().hex
        self._sliding: dict[str, dict[int, int]] = defaultdict(dict)
        self._calendar: dict[str, _Calendar] = {}
        self._leases: dict[str, dict[str, float]] = defaultdict(dict)
        self._reservations: dict[str, _Reservation] = {}
        # (UTC day YYYYMMDD, "scope|dimension") -> refusals, as Redis counts them by day.
        self.denial_counts: dict[tuple[str, str], int] = defaultdict(int)

    def counter_key(self, quota: Quota, epoch: str, now: float) -> str:
        if quota.window == "day":
            return f"{quota.counter}:{epoch}:d{datetime.fromtimestamp(now, tz=UTC):%Y%m%d}"
        if quota.window == "month":
            return f"{quota.counter}:{epoch}:m{datetime.fromtimestamp(now, tz=UTC):%Y%m}"
        if quota.kind == "l":
            return f"{quota.counter}:l"
        return f"{quota.counter}:{quota.kind}{quota.window}"

    def away(self) -> bool:
        """Never: it lives in this process."""
        return False

    # --- tokens ---
    def tokens(self) -> tuple[str, str]:
        return self._version, self._epoch

    def bump_version(self) -> None:
        self._version = uuid.uuid4().hex

    def rotate_epoch(self) -> None:
        self._epoch = uuid.uuid4().hex

    # --- admission ---
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
        gate: CacheGate | None = None,  # not looked at: no shared cache entries here
    ) -> Decision:
        with self._lock:
            if version != self._version or epoch != self._epoch:
                raise StalePolicy(self._version, self._epoch)
            self._sweep_locked(now, 5)
            if mode == "full" and request_id in self._reservations:
                raise DuplicateRequest(f"Request {request_id} is already in flight.")
            day_left, month_left = seconds_left(now)
            amounts = {"r": 1, "t": est_tokens, "c": est_cost, "l": 1}
            missing: list[Quota] = []
            states: list[WindowState] = []
            worst: WindowState | None = None
            worst_wait = -1.0
            for quota in quotas:
                key = self.counter_key(quota, epoch, now)
                # A hit counts as a request; its other windows are only read (headers).
                applies = mode != "hit" or quota.kind == "r"
                amount = amounts[quota.kind] if applies else 0
                if quota.window in ("day", "month"):
                    cal = self._calendar.get(key)
                    if cal is None or cal.expires <= now:
                        if applies:
                            missing.append(quota)
                        used = 0
                    else:
                        used = cal.get(quota.kind)
                    reset = float(day_left if quota.window == "day" else month_left)
                    wait = reset
                elif quota.kind == "l":
                    leases = self._leases[key]
                    for rid in [r for r, exp in leases.items() if exp <= now]:
                        del leases[rid]
                    used = len(leases)
                    reset = min(leases.values()) - now if leases else 0.0
                    wait = 1.0
                else:
                    used, reset, wait = self._sliding_read(
                        key, int(quota.window), amount, quota.limit, now
                    )
                state = WindowState(quota, used, reset)
                states.append(state)
                over = used + amount > quota.limit or quota.limit <= 0  # 0 refuses all
                if applies and over and wait > worst_wait:
                    worst, worst_wait = state, wait
            if missing:
                raise RebuildNeeded(missing)
            if worst is not None:
                day = f"{datetime.fromtimestamp(now, tz=UTC):%Y%m%d}"
                self.denial_counts[(day, f"{worst.quota.scope}|{worst.quota.dimension}")] += 1
                return Decision(False, states, worst, worst_wait, backend=self.name)

            reservation = _Reservation(est_tokens, est_cost, deadline=now + _lease_ttl())
            seen: set[str] = set()
            after: list[WindowState] = []
            for state in states:
                quota = state.quota
                key = self.counter_key(quota, epoch, now)
                amount = amounts[quota.kind]
                if mode == "hit" and quota.kind != "r":
                    after.append(state)
                    continue
                if quota.kind == "l":
                    self._leases[key][request_id] = now + _lease_ttl()
                    reservation.ops.append((key, "l", "", None))
                elif quota.window in ("day", "month"):
                    if key not in seen:
                        seen.add(key)
                        cal = self._calendar[key]
                        cal.r += 1
                        cal.t += est_tokens
                        cal.c += est_cost
                        reservation.ops.append((key, "cal", "", cal.gen))
                else:
                    size = int(quota.window) / SUB
                    current = math.floor(now / size)
                    buckets = self._sliding[key]
                    buckets[current] = buckets.get(current, 0) + amount
                    for idx in [i for i in buckets if i < current - SUB]:
                        del buckets[idx]
                    reservation.ops.append((key, quota.kind, str(current), None))
                reset = state.reset_in
                if (
                    not reset
                    and amount
                    and quota.kind in ("r", "t")
                    and isinstance(quota.window, int)
                ):
                    size = quota.window / SUB
                    reset = (math.floor(now / size) + SUB + 1) * size - now
                after.append(WindowState(quota, state.used + amount, reset))
            if mode == "full":
                self._reservations[request_id] = reservation
            return Decision(True, after, backend=self.name)

    def _sliding_read(
        self, key: str, window: int, amount: int, limit: int, now: float
    ) -> tuple[int, float, float]:
        size = window / SUB
        current = math.floor(now / size)
        buckets = sorted(
            (i, c) for i, c in self._sliding.get(key, {}).items() if i >= current - SUB
        )
        used = sum(c for _, c in buckets)
        need = used + amount - limit
        wait, reset, freed = float(window), 0.0, 0
        for idx, count in buckets:
            if count > 0 and not reset:
                reset = (idx + SUB + 1) * size - now
            freed += count
            if need > 0 and freed >= need:
                wait = (idx + SUB + 1) * size - now
                need = 0
        if amount > limit:
            wait = float(window)
        return used, reset, wait

    # --- settlement ---
    def settle(
        self,
        *,
        request_id: str,
        tokens: int,
        cost: int,
        refund: bool,
        riders: Sequence[ScriptCall] = (),
        meanwhile: Callable[[], None] | None = None,
    ) -> bool:
        """Settle in the process; `riders` (Redis calls of other services, should there be
        a Redis for them) are sent on their own, `meanwhile` run while they are out."""
        run_calls(riders, meanwhile)
        with self._lock:
            res = self._reservations.pop(request_id, None)
            if res is None:
                return False
            self._apply(request_id, res, tokens, cost, refund)
            return True

    def renew(self, *, request_id: str, now: float) -> bool:
        """Keep a running request's reservation and leases for another lease's life."""
        with self._lock:
            res = self._reservations.get(request_id)
            if res is None or res.swept:
                return False
            res.deadline = now + _lease_ttl()
            for key, kind, _, _ in res.ops:
                if kind == "l" and request_id in self._leases[key]:
                    self._leases[key][request_id] = res.deadline
            return True

    def _apply(self, rid: str, res: _Reservation, tokens: int, cost: int, refund: bool) -> None:
        act = {"r": 0 if refund else 1, "t": 0 if refund else tokens, "c": 0 if refund else cost}
        reserved = {"r": 1, "t": res.tokens, "c": res.cost}
        for key, kind, bucket, gen in res.ops:
            if kind == "l":
                self._leases[key].pop(rid, None)
            elif kind == "cal":
                cal = self._calendar.get(key)
                if cal is None:
                    continue
                fresh = res.swept or cal.gen != gen
                if fresh and refund:
                    continue
                for k in ("r", "t", "c"):
                    cal.add(k, act[k] if fresh else act[k] - reserved[k])
            else:
                buckets = self._sliding.get(key)
                if buckets is None:
                    continue
                delta = act[kind] if res.swept else act[kind] - reserved[kind]
                buckets[int(bucket)] = buckets.get(int(bucket), 0) + delta

    def _sweep_locked(self, now: float, limit: int) -> int:
        swept = 0
        for rid, res in list(self._reservations.items()):
            if swept >= limit:
                break
            if not res.swept and res.deadline <= now:
                self._apply(rid, res, 0, 0, refund=True)
                res.swept = True
                swept += 1
        return swept

    def sweep(self, *, now: float, limit: int = 100) -> int:
        with self._lock:
            return self._sweep_locked(now, limit)

    # --- rebuild, reads, resets ---
    def carried(self, epoch: str) -> list[str]:
        """None: this backend's epoch turns only with its process's counters (fail-open)."""
        return []

    def init_calendar(
        self,
        entries: list[tuple[str, int, int, int, int]],
        in_ledger: Iterable[str] = (),
        *,
        epoch: str = "",
    ) -> int:
        created = 0
        now = datetime.now(tz=UTC).timestamp()
        with self._lock:
            for key, r, t, c, ttl in entries:
                existing = self._calendar.get(key)
                if existing is None or existing.expires <= now:
                    self._calendar[key] = _Calendar(uuid.uuid4().hex, r, t, c, now + ttl)
                    created += 1
        return created

    def read(
        self, *, quotas: tuple[Quota, ...], version: str, epoch: str, now: float
    ) -> list[WindowState]:
        day_left, month_left = seconds_left(now)
        states = []
        missing: list[Quota] = []
        with self._lock:
            if version != self._version or epoch != self._epoch:
                raise StalePolicy(self._version, self._epoch)
            for quota in quotas:
                key = self.counter_key(quota, epoch, now)
                if quota.kind == "l":
                    used = sum(1 for exp in self._leases.get(key, {}).values() if exp > now)
                    states.append(WindowState(quota, used, 0))
                elif quota.window in ("day", "month"):
                    cal = self._calendar.get(key)
                    if cal is None or cal.expires <= now:
                        missing.append(quota)
                    left = day_left if quota.window == "day" else month_left
                    states.append(WindowState(quota, cal.get(quota.kind) if cal else 0, left))
                else:
                    used, reset, _ = self._sliding_read(key, int(quota.window), 0, quota.limit, now)
                    states.append(WindowState(quota, used, reset))
        if missing:
            raise RebuildNeeded(missing)
        return states

    def reset_counters(self, *, counter: str) -> int:
        deleted = 0
        with self._lock:
            for store in (self._sliding, self._calendar, self._leases):
                for key in [k for k in store if k.startswith(f"{counter}:")]:
                    del store[key]  # type: ignore[attr-defined]
                    deleted += 1
        return deleted

    def denials(self, *, day: str) -> dict[str, int]:
        return {name: n for (on, name), n in self.denial_counts.items() if on == day}


def _lease_ttl() -> int:
    from django.conf import settings

    return int(settings.QUOTA_LEASE_TTL)

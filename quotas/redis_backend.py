"""The Redis quota backend: one Lua call to admit, one to settle.

Scripts are registered once per process on the raw connection of django-redis and called
with EVALSHA (redis-py reloads them after NOSCRIPT). Key layout, under `<prefix>:q:`:

    ver, epoch                       policy version and counter epoch (tokens)
    {<counter>}:<kind><seconds>      sliding window: hash of 12 sub-buckets
    {<counter>}:<epoch>:d<YYYYMMDD>  UTC day: hash r, t, c (+ g, its generation)
    {<counter>}:<epoch>:m<YYYYMM>    UTC month: same
    {<counter>}:l                    concurrency leases: zset request id -> expiry
    res:<request id>, resx           reservations and their expiry index (one in flight
                                     is kept as long as its counters count it, so that
                                     a dead worker's is refunded however late the sweep;
                                     a settled one a few seconds, marked settled)
    settled:<second>                 the requests settled in that second
    carry:<epoch>                    reservations in flight (or just settled) when that
                                     epoch began
    den:<YYYYMMDD>                   refusals of the day by "scope|dimension"

Sliding windows (minute, hour) count 12 sub-buckets of window/12 seconds and admit only
if the sum of every bucket overlapping the last `window` seconds leaves room. Worst-case
error, stated exactly: never more than the limit in ANY interval of the window's length
(no double burst at a boundary, no over-admission at all); the price is that a refusal may
come up to one sub-bucket early (5 s for a minute window, 5 min for an hour), so a client
refused at the limit waits at most window + window/12 for its oldest request to age out.
Day and month windows are exact UTC calendar windows.

The counter epoch is part of every calendar key: rotating it (after a period of fail-open
service, or when Redis lost its data) makes every day and month counter rebuild from the
ledger before its next use. The ledger has no row yet of a request in flight at the
rotation: each rebuilt counter takes in the reservations of its own counter and period
that were in flight then, and their settlements go to it as to any other.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from django.conf import settings
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)

from config.outages import REDIS_DOWN, Outage, redis_outage
from config.redis_calls import ScriptCall, run_calls
from quotas.engine import (
    BackendAway,
    BackendUnavailable,
    CacheGate,
    Decision,
    RebuildNeeded,
    StalePolicy,
    WindowState,
    seconds_left,
)
from quotas.errors import DuplicateRequest
from quotas.policy import DIMENSION_SPECS, Quota

_LUA = Path(__file__).with_name("lua")


def _settled_kept() -> int:
    """Seconds a settled request stays known to rotations (settle.lua, rotate.lua): longer
    than its ledger INSERT may take (LEDGER_WRITE_TIMEOUT_MS), with room to spare."""
    return max(10, math.ceil(2 * settings.LEDGER_WRITE_TIMEOUT))


def _busy(exc: BaseException) -> bool:
    """Redis refused the call, unrun, while another client's script holds the server past
    its busy-reply threshold: unavailable for now, as an unreachable Redis is."""
    return isinstance(exc, RedisError) and str(exc).startswith("BUSY")


# Redis unreachable, or answering that it cannot serve now: loading its data set
# (BusyLoadingError is a ConnectionError), out of memory, read-only (a master demoted by a
# failover), a replica whose master is down, a cluster slot moving.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    *REDIS_DOWN,
    OutOfMemoryError,
    ReadOnlyError,
    ClusterDownError,
    TryAgainError,
)


_PARTS_KEPT = 1000  # tuples of quotas whose keys and arguments are kept (see _quota_part)


def _window_arg(kind: str, window: int | str) -> str:
    """How admit.lua is told a quota's window: seconds, "day", "month" or "lease"."""
    return "lease" if kind == "l" else str(window)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQuotaBackend:
    name = "redis"

    def __init__(self) -> None:
        self.prefix = f"{settings.REDIS_KEY_PREFIX}:q"
        # id(quotas) -> (quotas, epoch, day, counter keys, admit.lua arguments)
        self._parts: dict[int, tuple[Any, str, str, list[str], list[Any]]] = {}

    @cached_property
    def client(self) -> Any:
        from django_redis import get_redis_connection

        return get_redis_connection("default")

    @cached_property
    def outage(self) -> Outage:
        """This Redis server's outage, shared with every part of the process that uses it:
        while it lasts, every call raises BackendAway at once (its check, a PING from a
        thread of the worker's own, finds it back)."""
        return redis_outage(self.client)

    def away(self) -> bool:
        """Whether Redis is left alone now (`Outage.away`)."""
        return self.outage.away()

    def _left_alone(self) -> BackendAway:
        return BackendAway("Redis did not answer a moment ago: left alone for now")

    def _unavailable(self, exc: BaseException) -> BackendUnavailable:
        """The error to raise for a call Redis could not serve. One it did not answer
        (refused, timed out) is its server's outage: every part of the process leaves it
        alone until its check has found it back."""
        if isinstance(exc, REDIS_DOWN):
            self.outage.failed(exc)
            return BackendAway(str(exc))
        return BackendUnavailable(str(exc))

    @contextmanager
    def _asking(self) -> Iterator[None]:
        """One call to Redis off the hot path: BackendAway at once while Redis is left
        alone, BackendUnavailable for a call it could not serve, its outage told of it."""
        if self.outage.away():
            raise self._left_alone()
        try:
            yield
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        except RedisError as exc:
            if _busy(exc):
                raise BackendUnavailable(str(exc)) from exc
            raise
        self.outage.answered()

    @cached_property
    def _admit(self) -> Any:
        return self.client.register_script((_LUA / "admit.lua").read_text())

    @cached_property
    def _settle(self) -> Any:
        return self.client.register_script((_LUA / "settle.lua").read_text())

    @cached_property
    def _read(self) -> Any:
        return self.client.register_script((_LUA / "read.lua").read_text())

    @cached_property
    def _renew(self) -> Any:
        return self.client.register_script((_LUA / "renew.lua").read_text())

    @cached_property
    def _rotate(self) -> Any:
        return self.client.register_script((_LUA / "rotate.lua").read_text())

    @cached_property
    def _init_calendar(self) -> Any:
        return self.client.register_script((_LUA / "init_calendar.lua").read_text())

    # --- keys ---
    def counter_key(self, quota: Quota, epoch: str, now: float) -> str:
        return self._counter_key(quota, epoch, f"{datetime.fromtimestamp(now, tz=UTC):%Y%m%d}")

    def _counter_key(self, quota: Quota, epoch: str, day: str) -> str:
        """`counter_key` with the UTC day of `now` (YYYYMMDD) formatted once per call."""
        base = f"{self.prefix}:{{{quota.counter}}}"
        kind, window = DIMENSION_SPECS[quota.dimension]
        if window == "day":
            return f"{base}:{epoch}:d{day}"
        if window == "month":
            return f"{base}:{epoch}:m{day[:6]}"
        if kind == "l":
            return f"{base}:l"
        return f"{base}:{kind}{window}"

    def _quota_part(
        self, quotas: tuple[Quota, ...], epoch: str, day: str, *, keep: bool
    ) -> tuple[list[str], list[Any]]:
        """The counter keys and admit.lua arguments of `quotas` in this epoch and UTC day.

        They are the same for every request of a policy and priority all day long, and a
        policy keeps one tuple of quotas per priority for its life (Policy.quotas_for): they
        are kept per tuple (`keep`), the tuple itself held so that its id is not reused."""
        found = self._parts.get(id(quotas)) if keep else None
        if found is not None and found[0] is quotas and found[1] == epoch and found[2] == day:
            return found[3], found[4]
        keys: list[str] = []
        args: list[Any] = []
        for quota in quotas:
            kind, window = DIMENSION_SPECS[quota.dimension]
            keys.append(self._counter_key(quota, epoch, day))
            args += [quota.scope, quota.dimension, quota.limit, kind, _window_arg(kind, window)]
        if keep:
            if len(self._parts) >= _PARTS_KEPT:  # policies replaced over a long life
                self._parts.clear()
            self._parts[id(quotas)] = (quotas, epoch, day, keys, args)
        return keys, args

    # --- calls ---
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
    ) -> Decision:
        if self.outage.away():
            raise self._left_alone()
        day_left, month_left = seconds_left(now)
        day = f"{datetime.fromtimestamp(now, tz=UTC):%Y%m%d}"
        keys = [
            f"{self.prefix}:ver",
            f"{self.prefix}:epoch",
            f"{self.prefix}:res:{request_id}",
            f"{self.prefix}:resx",
            f"{self.prefix}:den:{day}",
        ]
        args: list[Any] = [
            repr(now),
            request_id,
            version,
            epoch,
            uuid.uuid4().hex,
            settings.QUOTA_LEASE_TTL,
            mode,
            est_tokens,
            est_cost,
            day_left,
            month_left,
            len(quotas),
        ]
        quota_keys, quota_args = self._quota_part(quotas, epoch, day, keep=mode != "hit")
        keys += quota_keys
        args += quota_args
        if gate is not None:
            keys += [gate.entry, gate.lock]
            args += [gate.token, gate.lock_ms]
        call = ScriptCall(self._admit, keys=keys, args=args)
        run_calls((call,))
        error = call.error
        if error is not None:
            if isinstance(error, _UNAVAILABLE):
                raise self._unavailable(error) from error
            if _busy(error):
                raise BackendUnavailable(str(error)) from error
            raise error
        reply = call.reply
        self.outage.answered()
        status = _text(reply[0])
        if status == "stale":
            raise StalePolicy(_text(reply[1]), _text(reply[2]))
        if status == "rebuild":
            raise RebuildNeeded([quotas[int(i) - 1] for i in reply[1:]])
        if status == "dup":
            raise DuplicateRequest(f"Request {request_id} is already in flight.")
        offset = 1 if status == "ok" else 3
        states = reply[offset + 1 : offset + 1 + 2 * int(reply[offset])]
        # int() and float() read the bytes of Redis replies as they are.
        windows = [
            WindowState(quota, int(used), float(reset_in))
            for quota, used, reset_in in zip(quotas, states[0::2], states[1::2], strict=False)
        ]
        decision = Decision(admitted=status == "ok", windows=windows)
        if status != "ok":
            decision.denied = windows[int(reply[1]) - 1]
            decision.retry_after = float(_text(reply[2]))
        if gate is not None:
            entry, locked, applied = reply[-3:]
            decision.looked_up, decision.entry, decision.locked = True, entry, bool(locked)
            decision.hit = applied == b"hit"
            if decision.hit:  # only the request windows were counted, the token ones read
                decision.windows = [w for w in windows if w.quota.kind in ("r", "t")]
        return decision

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
        """Settle (or refund) one reservation; `riders`, other services' script calls
        (the cache store of this very answer), go in the same round trip, and `meanwhile`
        (the ledger INSERT) runs while Redis works on it (`run_calls`), or at once if Redis
        is left alone (BackendAway, and the riders are not sent)."""
        if self.outage.away():
            if meanwhile is not None:
                meanwhile()
            raise self._left_alone()
        call = ScriptCall(
            self._settle,
            keys=[f"{self.prefix}:res:{request_id}", f"{self.prefix}:resx", f"{self.prefix}:epoch"],
            args=[
                request_id,
                "refund" if refund else "settle",
                tokens,
                cost,
                f"{self.prefix}:settled:",
                _settled_kept(),
            ],
        )
        run_calls([call, *riders], meanwhile)
        error = call.error
        if error is not None:
            if isinstance(error, _UNAVAILABLE):
                raise self._unavailable(error) from error
            if _busy(error):  # not run: sent again later (settlement_defer)
                raise BackendUnavailable(str(error)) from error
            raise error
        self.outage.answered()
        return bool(call.reply)

    def renew(self, *, request_id: str, now: float) -> bool:
        """Keep a running request's reservation and leases for another lease's life."""
        with self._asking():
            return bool(
                self._renew(
                    keys=[f"{self.prefix}:res:{request_id}", f"{self.prefix}:resx"],
                    args=[request_id, repr(now), settings.QUOTA_LEASE_TTL],
                )
            )

    def carried(self, epoch: str) -> list[str]:
        """The request ids carried into `epoch`: in flight, or just settled, when it began."""
        with self._asking():
            ids = self.client.smembers(f"{self.prefix}:carry:{epoch}")
        return [_text(rid) for rid in ids]

    def init_calendar(
        self,
        entries: list[tuple[str, int, int, int, int]],
        in_ledger: Iterable[str] = (),
        *,
        epoch: str = "",
    ) -> int:
        """Create calendar hashes (key, requests, tokens, micro-USD, ttl) of `epoch` unless
        present, each with the reservations carried into that epoch (in flight, or just
        settled, at its rotation: `carried`) that were counted in its counter, but those of
        `in_ledger`, whose rows the ledger sums counted (init_calendar.lua)."""
        args: list[Any] = [uuid.uuid4().hex]
        for _, r, t, c, ttl in entries:
            args += [r, t, c, ttl]
        args += [f"{self.prefix}:res:", *in_ledger]
        keys = [e[0] for e in entries] + [f"{self.prefix}:carry:{epoch}"]
        with self._asking():
            return int(self._init_calendar(keys=keys, args=args))

    def tokens(self) -> tuple[str, str]:
        """The current (policy version, counter epoch), creating them if missing."""
        with self._asking():
            pipe = self.client.pipeline()
            fresh = uuid.uuid4().hex
            pipe.set(f"{self.prefix}:ver", fresh, nx=True)
            pipe.set(f"{self.prefix}:epoch", fresh, nx=True)
            pipe.mget(f"{self.prefix}:ver", f"{self.prefix}:epoch")
            version, epoch = pipe.execute()[2]
        return _text(version), _text(epoch)

    def bump_version(self) -> None:
        with self._asking():
            self.client.set(f"{self.prefix}:ver", uuid.uuid4().hex)

    def rotate_epoch(self) -> None:
        """A new counter epoch (rotate.lua): day and month counters are rebuilt from the
        ledger, each taking in the reservations in flight now (init_calendar.lua)."""
        with self._asking():
            self._rotate(
                keys=[f"{self.prefix}:epoch", f"{self.prefix}:resx"],
                args=[
                    uuid.uuid4().hex,
                    f"{self.prefix}:carry:",
                    2 * settings.QUOTA_LEASE_TTL,
                    f"{self.prefix}:settled:",
                    _settled_kept(),
                ],
            )

    def read(
        self, *, quotas: tuple[Quota, ...], version: str, epoch: str, now: float
    ) -> list[WindowState]:
        """Current standing of each quota without changing anything (GET /api/v1/quota, the
        rate-limit headers): one script call, whatever the number of quotas. Raises
        StalePolicy and RebuildNeeded as `admit` does, so that a reader never shows the
        limits of an old policy or the empty counters of a new epoch."""
        if not quotas:
            return []
        day_left, month_left = seconds_left(now)
        day = f"{datetime.fromtimestamp(now, tz=UTC):%Y%m%d}"
        keys: list[str] = [f"{self.prefix}:ver", f"{self.prefix}:epoch"]
        how: list[int | str] = []
        for quota in quotas:
            keys.append(self._counter_key(quota, epoch, day))
            if quota.kind == "l":
                how.append("lease")
            elif quota.window in ("day", "month"):
                how.append(quota.kind)
            else:
                how.append(quota.window)
        with self._asking():
            reply = self._read(keys=keys, args=[now, version, epoch, *how])
        status = _text(reply[0])
        if status == "stale":
            raise StalePolicy(_text(reply[1]), _text(reply[2]))
        if status == "rebuild":
            raise RebuildNeeded([quotas[int(i) - 1] for i in reply[1:]])
        states = []
        for quota, value in zip(quotas, reply[1:], strict=True):
            if quota.kind == "l":
                states.append(WindowState(quota, int(value), 0))
            elif quota.window in ("day", "month"):
                left = day_left if quota.window == "day" else month_left
                states.append(WindowState(quota, int(value or 0), left))
            else:  # the sum of its sub-buckets, and the oldest that holds anything
                used, first = value
                size = int(quota.window) / 12
                states.append(
                    WindowState(quota, int(used), (first + 13) * size - now if first else 0.0)
                )
        return states

    def reset_counters(self, *, counter: str) -> int:
        """Delete every counter of one principal (sliding, calendar, leases)."""
        deleted = 0
        with self._asking():
            for key in self.client.scan_iter(match=f"{self.prefix}:{{{counter}}}:*", count=500):
                deleted += self.client.delete(key)
        return deleted

    def denials(self, *, day: str) -> dict[str, int]:
        with self._asking():  # quota_global reports without them
            raw = self.client.hgetall(f"{self.prefix}:den:{day}")
        return {_text(k): int(v) for k, v in raw.items()}

    def sweep(self, *, now: float, limit: int = 100) -> int:
        """Refund reservations whose lease expired (their worker is presumed dead).

        Runs the admission script with no quotas: its sweep refunds up to 5 reservations a
        call and marks them, so that a worker that was only slow still settles exactly.
        """
        swept = 0
        while swept < limit:
            due = self.client.zcount(f"{self.prefix}:resx", "-inf", now)
            if not due:
                break
            version, epoch = self.tokens()
            try:
                self.admit(
                    quotas=(),
                    request_id=f"sweep-{uuid.uuid4().hex}",
                    version=version,
                    epoch=epoch,
                    est_tokens=0,
                    est_cost=0,
                    mode="hit",
                    now=now,
                )
            except StalePolicy:
                continue
            swept += min(int(due), 5)
        return swept

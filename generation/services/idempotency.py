"""Idempotency-Key: the first answer of a (user, key) is kept in Redis (Django's cache)
for GENERATION_IDEMPOTENCY_TTL seconds and returned to every retry, which is not charged
again.

Redis unreachable: the keys are kept in this process instead (`_store`), so a request is
never failed because of its Idempotency-Key; a retry that reaches the same worker still
replays, one that reaches another worker runs again (and is charged again) until Redis is
back. The quota engine decides separately whether to serve at all (QUOTA_FAIL_MODE).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.locmem import LocMemCache
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import RedisError

from config.outages import default_redis_outage, redis_unanswered
from generation.errors import IdempotencyConflict


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored first answer: status, body and headers to send again."""

    status: int
    body: Any
    headers: dict[str, str]


_local = LocMemCache("tollgate-idempotency", {"OPTIONS": {"MAX_ENTRIES": 10000}})
_UNREACHABLE = (RedisError, ConnectionInterrupted, OSError)


def _store(op: Callable[[BaseCache], Any]) -> Any:
    """Run one cache operation on Django's cache, or on the in-process one while Redis is
    unreachable, or away for any part of this worker (config.outages)."""
    outage = default_redis_outage()
    if outage is not None and outage.away():
        return op(_local)
    try:
        result = op(cache)
    except _UNREACHABLE as exc:
        if outage is not None and redis_unanswered(exc):
            outage.failed(exc)
        return op(_local)
    if outage is not None:
        outage.answered()
    return result


def _idempotency_slot(user_id: int, key: str) -> str:
    return "idem:" + hashlib.sha256(f"{user_id}\x00{key}".encode()).hexdigest()


def idempotency_claim_seconds(upstream_calls: int = 1) -> int:
    """How long a claimed key stays in flight: the longest a request making `upstream_calls`
    upstream calls one after another can take. Each call may first wait for an identical one
    another request makes (single flight), then be made, retried, within its retry budget
    and one read: twice (UPSTREAM_MAX_RETRY_SECONDS + UPSTREAM_READ_TIMEOUT) a call, and a
    margin. A claim that lapsed before its request ended would let a retry run, and be
    charged, a second time."""
    call = settings.UPSTREAM_MAX_RETRY_SECONDS + settings.UPSTREAM_READ_TIMEOUT
    return math.ceil(max(1, upstream_calls) * 2 * call + 30)


def idempotency_stream_claim_seconds() -> int:
    """How long a stream's claimed key stays in flight, and is kept in flight again at each
    renewal of the stream's lease (`IdempotencyClaim.renew`): a stream runs as long as its
    client reads it, so no length covers it; the claim first lasts as long as the stream
    may take to begin (`idempotency_claim_seconds`) and at least a lease's life
    (QUOTA_LEASE_TTL), whose renewal, every third of it from the admission on, renews the
    claim too."""
    return max(idempotency_claim_seconds(1), math.ceil(settings.QUOTA_LEASE_TTL))


def idempotency_begin(
    *, user_id: int, key: str, fingerprint: str, upstream_calls: int = 1, stream: bool = False
) -> Replay | None:
    """Claim an Idempotency-Key for this user: None when the request should run, the stored
    answer when a first one exists. Raises IdempotencyConflict (409) when the same key is in
    flight or was used for a different request body. `stream`: the claim is a stream's
    (`idempotency_stream_claim_seconds`), which must be renewed while it runs."""
    slot = _idempotency_slot(user_id, key)
    pending = {"state": "pending", "fingerprint": fingerprint}
    budget = (
        idempotency_stream_claim_seconds() if stream else idempotency_claim_seconds(upstream_calls)
    )
    if _store(lambda c: c.add(slot, pending, timeout=budget)):
        return None
    stored = _store(lambda c: c.get(slot))
    if stored is None:  # expired between the two calls
        if _store(lambda c: c.add(slot, pending, timeout=budget)):
            return None
        stored = _store(lambda c: c.get(slot)) or pending
    if stored.get("fingerprint") != fingerprint:
        raise IdempotencyConflict("This Idempotency-Key was already used for a different request.")
    if stored.get("state") != "done":
        raise IdempotencyConflict()
    return Replay(status=stored["status"], body=stored["body"], headers=stored["headers"])


def idempotency_finish(*, user_id: int, key: str, fingerprint: str, replay: Replay | None) -> None:
    """Store the first answer for GENERATION_IDEMPOTENCY_TTL seconds, or (None: the request
    failed) release the key so that a retry runs again."""
    slot = _idempotency_slot(user_id, key)
    if replay is None:
        _store(lambda c: c.delete(slot))
        return
    done = {
        "state": "done",
        "fingerprint": fingerprint,
        "status": replay.status,
        "body": replay.body,
        "headers": replay.headers,
    }
    _store(lambda c: c.set(slot, done, timeout=settings.GENERATION_IDEMPOTENCY_TTL))


class IdempotencyClaim:
    """A key claimed by a request whose end is not the view's to see (a stream, answered
    after the view returned): `renew` keeps it in flight while the request runs (from the
    stream's lease renewal, on another thread), `finish` stores its answer or releases it,
    once; later calls of either do nothing. A renewal never lands after the finish (it
    would cut a stored answer's life to a claim's)."""

    def __init__(self, *, user_id: int, key: str, fingerprint: str) -> None:
        self.user_id = user_id
        self.key = key
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._finished = False

    def renew(self) -> None:
        slot = _idempotency_slot(self.user_id, self.key)
        with self._lock:
            if not self._finished:
                seconds = idempotency_stream_claim_seconds()
                _store(lambda c: c.touch(slot, timeout=seconds))

    def finish(self, replay: Replay | None) -> None:
        """Store `replay` as the answer, or (None: the request failed or was left) release
        the key so that a retry runs again; only the first call counts."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            idempotency_finish(
                user_id=self.user_id, key=self.key, fingerprint=self.fingerprint, replay=replay
            )


def request_fingerprint(path: str, data: Any) -> str:
    """A stable hash of what a request asks for (path and parsed body)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{path}\x00{canonical}".encode()).hexdigest()


def idempotent_run(
    *,
    user_id: int,
    key: str | None,
    fingerprint: str,
    run: Callable[[], Replay],
    upstream_calls: int = 1,
) -> tuple[Replay, bool]:
    """Run `run` once per (user, Idempotency-Key): (answer, replayed). Without a key it just
    runs. A failed run releases the key so that the client's retry runs again (failures are
    refunded, so nothing is charged twice either way). `upstream_calls`: how many calls
    `run` may make one after another (`idempotency_claim_seconds`)."""
    if not key:
        return run(), False
    replay = idempotency_begin(
        user_id=user_id, key=key, fingerprint=fingerprint, upstream_calls=upstream_calls
    )
    if replay is not None:
        return replay, True
    try:
        answer = run()
    except BaseException:
        idempotency_finish(user_id=user_id, key=key, fingerprint=fingerprint, replay=None)
        raise
    idempotency_finish(user_id=user_id, key=key, fingerprint=fingerprint, replay=answer)
    return answer, False

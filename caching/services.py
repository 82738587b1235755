"""The cache tier's public interface (used by generation, the topic endpoints and ops).

A look-up tries this process's memory layer, then Redis; a Redis hit is promoted into
memory. Values are JSON-serialisable dicts; every hit returns a fresh copy. How the two
layers are laid out in Redis and how invalidations reach every worker within a second is
described in caching/tier.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from caching.errors import CacheUnavailable
from caching.patterns import pattern_compile
from caching.tier import (
    REDIS_RETRY_SECONDS,
    STAT_FIELDS,
    CacheTier,
    Flight,
    count_invalidation,
    encode,
    new_token,
    split_key,
    tier,
    tier_reset,
)
from config.outages import REDIS_DOWN, redis_server
from config.redis_calls import ScriptCall, run_calls

logger = logging.getLogger("tollgate.caching")

_SPACES = re.compile(r"\s+")
POPULAR_LIMIT = 10


@dataclass(frozen=True, slots=True)
class CacheHit:
    value: dict[str, Any]
    layer: str  # "memory" | "redis"
    stale: bool = False


def topic_normalise(topic: str) -> str:
    """Case- and whitespace-insensitive form of a topic."""
    return _SPACES.sub(" ", topic).strip().lower()


def cache_key_generation(
    *, model: str, messages: list[dict[str, str]], params: dict[str, Any]
) -> str:
    """Key of a generation request: a hash of everything that changes the answer."""
    canonical = json.dumps(
        {"model": model, "messages": messages, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "gen:" + hashlib.sha256(canonical.encode()).hexdigest()


def cache_key_topic(
    *, kind: str, topic: str, model: str, extra: str = "", prompts: str = ""
) -> str:
    """Key of a topic answer: `topic:<normalised topic>:<kind>:<hash of model, extra and
    prompts>`, so that `topic:python*` invalidates every answer about topics starting with
    python. `prompts`: the version of the prompts the answer is built from, so that one
    built from other prompts (before a deploy that changed them) is not found."""
    digest = hashlib.sha256(f"{model}\x00{extra}\x00{prompts}".encode()).hexdigest()[:16]
    return f"topic:{topic_normalise(topic)}:{kind}:{digest}"


def _parse(raw: bytes) -> tuple[float, float, str]:
    header, _, body = raw.partition(b"\n")
    fresh, stale = header.split(b" ")
    return float(fresh), float(stale), body.decode()


@dataclass(frozen=True, slots=True)
class FlightLock:
    """The single-flight lock of a key, taken by a miss's admission (`cache_probe`, then
    quotas' CacheGate): hand it to `single_flight`, which releases it once the answer is
    stored (or at once if computing it fails)."""

    key: str  # the lock's Redis key
    token: str


def cache_get(key: str, *, now: float | None = None) -> CacheHit | None:
    """A fresh answer from memory, else from Redis (then promoted into memory), else None.

    `now` (epoch seconds) defaults to the current time. A Redis failure is a miss.
    """
    return _lookup(key, now=time.time() if now is None else now)


def _lookup(key: str, *, now: float) -> CacheHit | None:
    hit, probe = _probe(key, now=now, lock_ms=0)
    if probe is None:
        return hit
    t = tier()
    if not t.available():  # Redis found away since the look-up began
        t.count("redis_misses", "redis", "miss")
        return None
    try:
        raw = t.redis.get(probe.entry_key)
    except Exception as exc:
        t.failed(exc, "cache read")
        t.count("redis_misses", "redis", "error")
        return None
    t.answered()
    fresh = raw is not None and now < _parse(raw)[0]
    return cache_probe_found(probe, raw if fresh else None, locked=False)[0]


@dataclass(frozen=True, slots=True)
class CacheProbe:
    """A look-up that missed this worker's memory layer, its Redis part to be done by
    another service's script in that service's round trip (the admission's CacheGate):
    read `entry_key`; on a miss, take `lock` for `lock_ms` (0: take no lock). Then
    `cache_probe_found`."""

    key: str
    entry_key: str
    lock: FlightLock
    lock_ms: int
    now: float
    # The memory layer's invalidation count before the script reads the entry: one applied
    # meanwhile keeps what it read out of memory (MemoryLayer.put).
    memory_mark: int


def cache_probe(
    key: str, *, lock_seconds: float | None, now: float | None = None
) -> tuple[CacheHit | None, CacheProbe | None]:
    """The memory layer's answer, else the Redis look-up left to another script:
    (hit, None), or (None, the probe), or (None, None) when Redis is unavailable.
    `lock_seconds=None`: a miss takes no single-flight lock (a stream is not coalesced)."""
    now = time.time() if now is None else now
    lock_ms = 0 if lock_seconds is None else max(1, int(lock_seconds * 1000))
    return _probe(key, now=now, lock_ms=lock_ms)


def _probe(key: str, *, now: float, lock_ms: int) -> tuple[CacheHit | None, CacheProbe | None]:
    t = tier()
    t.sync()
    payload = t.memory.get(key, now=now)
    if payload is not None:
        t.count("memory_hits", "memory", "hit")
        return CacheHit(value=json.loads(payload), layer="memory"), None
    t.count("memory_misses", "memory", "miss")
    # The look-up is the admission script's, or `_lookup`'s.
    if not t.available():
        t.count("redis_misses", "redis", "miss")
        return None, None
    # Without a lock to take, an empty token (the lock is then never handed out).
    lock = FlightLock(t.k("lock:" + key), new_token() if lock_ms else "")
    return None, CacheProbe(key, t.entry_key(key), lock, lock_ms, now, t.memory.invalidations)


def cache_probe_found(
    probe: CacheProbe, fresh: bytes | None, *, locked: bool
) -> tuple[CacheHit | None, FlightLock | None]:
    """What the probe's script found: the fresh entry (a Redis hit, promoted into memory)
    or None (a miss), and the lock if the script took it: (hit, None) or (None, lock)."""
    t = tier()
    if fresh is not None:
        fresh_until, _, body = _parse(fresh)
        expires_at = min(probe.now + settings.CACHE_MEMORY_TTL, fresh_until)
        t.memory.put(
            probe.key, body, expires_at=expires_at, unless_invalidated_since=probe.memory_mark
        )
        t.count("redis_hits", "redis", "hit")
        return CacheHit(value=json.loads(body), layer="redis"), None
    t.count("redis_misses", "redis", "miss")
    return None, probe.lock if locked else None


def cache_probe_stale(probe: CacheProbe, entry: bytes | None) -> CacheHit | None:
    """`cache_get_stale` from the entry a probe's script found (fresh or not): the answer
    if still within its stale time at the probe's moment, for the fallback when a quota
    is exhausted."""
    return _stale_of(tier(), entry, now=probe.now)


def cache_get_stale(key: str, *, now: float | None = None) -> CacheHit | None:
    """The last stored answer, fresh or past its TTL but within QUOTA_FALLBACK_CACHE_TTL,
    flagged `stale=True`: only for the fallback when a quota is exhausted. Never promoted."""
    t = tier()
    t.sync()
    now = time.time() if now is None else now
    raw = None
    if t.available():  # without Redis there are no stale copies
        try:
            raw = t.redis.get(t.entry_key(key))
        except Exception as exc:
            t.failed(exc, "stale cache read")
        else:
            t.answered()
    return _stale_of(t, raw, now=now)


def _stale_of(t: CacheTier, raw: bytes | None, *, now: float) -> CacheHit | None:
    if raw is not None:
        _, stale_until, body = _parse(raw)
        if now < stale_until:
            t.count("stale_hits", "stale", "hit")
            return CacheHit(value=json.loads(body), layer="redis", stale=True)
    t.count("stale_misses", "stale", "miss")
    return None


def cache_set(
    key: str,
    value: dict[str, Any],
    *,
    ttl: int | None = None,
    now: float | None = None,
    broadcast: bool = False,
) -> None:
    """Store an answer in both layers: fresh for `ttl` seconds (default CACHE_REDIS_TTL),
    then kept QUOTA_FALLBACK_CACHE_TTL longer as the stale copy. `broadcast=True` also drops
    older copies from every other worker's memory layer (a refresh of an existing answer).
    """
    _store(key, value, ttl=ttl, now=now, broadcast=broadcast)


def _store(
    key: str,
    value: dict[str, Any],
    *,
    ttl: int | None = None,
    now: float | None = None,
    broadcast: bool = False,
    lock: FlightLock | None = None,
) -> None:
    """`cache_set`; with `lock`, also release that single-flight lock in the same round trip."""
    pending = cache_store_later(key, value, lock=lock, ttl=ttl, now=now)
    pending.finish()
    if broadcast and pending.in_redis:
        t = tier()
        try:
            t.publish("key", key)
        except Exception as exc:
            t.failed(exc, "cache invalidation publish")


@dataclass(slots=True)
class PendingStore:
    """An answer to store, its Redis write not sent yet (`cache_store_later`).

    `calls`: that write (one script: SET the entry, release the single-flight lock if it is
    still ours), for another service to send in its own round trip (the settlement of the
    same request: `usage_settle(riders=...)`). Then `finish()` puts the answer in this
    worker's memory layer. If the write never went out, `finish()` sends it, unless Redis
    is away meanwhile; if it failed, the answer stays in memory alone and the lock is
    released on its own (best effort).
    """

    key: str
    body: str
    memory_until: float
    lock: FlightLock | None
    call: ScriptCall | None
    # The memory layer's invalidation count before the Redis write: one applied before
    # `finish()` (a purge of the entry just written) keeps the answer out of memory.
    memory_mark: int | None = None
    in_redis: bool = False
    finished: bool = False

    @property
    def calls(self) -> tuple[ScriptCall, ...]:
        return () if self.call is None else (self.call,)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        t = tier()
        call = self.call
        if call is not None:
            # Sent with another round trip (the settlement's), whose sender told the
            # server's outage how it went; else sent here, unless Redis is away.
            rode = call.ran
            if not rode and t.available():
                run_calls([call])
                if call.error is None:
                    t.answered()
            if call.ran and call.error is None:
                self.in_redis = True
            elif call.error is not None and not (rode and isinstance(call.error, REDIS_DOWN)):
                t.failed(call.error, "cache write")
        if self.lock is not None and not self.in_redis:
            _release(t, self.lock.key, self.lock.token)
        t.memory.put(
            self.key,
            self.body,
            expires_at=self.memory_until,
            unless_invalidated_since=self.memory_mark,
        )
        t.count("sets", "redis" if self.in_redis else "memory", "set")


def cache_store_later(
    key: str,
    value: dict[str, Any],
    *,
    lock: FlightLock | None = None,
    ttl: int | None = None,
    now: float | None = None,
) -> PendingStore:
    """Prepare the store of an answer (as `cache_set`, releasing `lock` with it) whose Redis
    write goes out with another round trip; see PendingStore. Call its `finish()`."""
    t = tier()
    t.sync()
    memory_mark = t.memory.invalidations
    now = time.time() if now is None else now
    fresh_until = now + (settings.CACHE_REDIS_TTL if ttl is None else ttl)
    stale_until = fresh_until + settings.QUOTA_FALLBACK_CACHE_TTL
    body = encode(value)
    split_key(key)
    call = None
    if t.available():
        raw = f"{fresh_until:.3f} {stale_until:.3f}\n{body}".encode()
        px = max(1, int((stale_until - now) * 1000))
        # Without a lock of ours, an empty token: the script then releases nothing.
        lock_key, token = (lock.key, lock.token) if lock else (t.k("lock:" + key), "")
        call = t.store_and_release_call(t.entry_key(key), raw, px, lock_key, token)
    return PendingStore(
        key=key,
        body=body,
        memory_until=min(now + settings.CACHE_MEMORY_TTL, fresh_until),
        lock=lock,
        call=call,
        memory_mark=memory_mark,
    )


def cache_shared_check() -> None:
    """Make sure the shared layer (Redis) takes answers now: one write of a short-lived key.
    A batch of work that stores answers (warming) asks first, since a store Redis does not
    take stays in the process's memory, out of every server's reach. Nothing to check
    without REDIS_URL. Raises CacheUnavailable when Redis does not answer or answers that
    it cannot write (out of memory, read-only)."""
    t = tier()
    client = t.redis
    if client is None:
        return
    try:
        client.set(t.k("check"), b"1", px=1000)
    except Exception as exc:  # any Redis error (redis-py's and the sockets')
        if isinstance(exc, REDIS_DOWN):
            t.failed(exc, "cache check")  # the server's outage: said once, left alone
        else:  # it answered that it cannot write: the tier leaves it alone a while
            t.down_until = time.monotonic() + REDIS_RETRY_SECONDS
        raise CacheUnavailable(
            f"Redis {redis_server(client)} cannot take the answers ({exc})."
        ) from exc


def cache_fresh_for(key: str, *, now: float | None = None) -> float | None:
    """Seconds the stored answer stays fresh (0 if only the stale copy is left), or None
    if nothing is stored. Reads Redis (the shared truth), not the memory layer."""
    t = tier()
    now = time.time() if now is None else now
    if not t.available():
        return None
    raw = t.redis.get(t.entry_key(key))
    if raw is None:
        return None
    return max(0.0, _parse(raw)[0] - now)


def cache_expire(key: str, *, now: float | None = None) -> bool:
    """End the fresh life of a stored answer but keep its stale copy (so that a refresh
    that fails upstream still leaves a fallback); every worker's memory copy is dropped.
    Returns False if nothing was stored."""
    t = tier()
    t.sync(force=True)
    now = time.time() if now is None else now
    t.memory.delete([key])
    if not t.available():
        return False
    entry_key = t.entry_key(key)
    raw = t.redis.get(entry_key)
    if raw is None:
        return False
    _, stale_until, body = _parse(raw)
    if stale_until <= now:
        return False
    expired = f"{now:.3f} {stale_until:.3f}\n{body}".encode()
    t.redis.set(entry_key, expired, px=max(1, int((stale_until - now) * 1000)), xx=True)
    t.publish("key", key)
    return True


def cache_delete(*, keys: Iterable[str]) -> int:
    """Invalidate exact keys (fresh and stale copies) everywhere; returns how many existed."""
    keys = list(keys)
    if not keys:
        return 0
    t = tier()
    t.sync(force=True)
    removed = t.memory.delete(keys)
    if t.redis is None:
        return removed
    removed = int(t.redis.unlink(*[t.entry_key(k) for k in keys]))
    t.publish("key", "\x00".join(keys))
    count_invalidation()
    return removed


def cache_invalidate(*, pattern: str) -> int:
    """Invalidate every key matching a glob pattern (`topic:python*`; case ignored, the
    language is in caching/patterns.py), fresh and stale copies, in Redis (SCAN, never
    KEYS) and in every worker's memory layer within a second. Returns how many entries
    were dropped (from Redis; from memory without Redis).

    Raises PatternError (a ValueError) for a pattern that does not parse.
    """
    compiled = pattern_compile(pattern)
    t = tier()
    t.sync(force=True)
    removed = t.memory.delete_matching(compiled.matches)
    if t.redis is None:
        return removed
    removed = 0
    for batch in t.scan_matching(compiled):
        removed += int(t.redis.unlink(*batch))
    t.publish("pattern", pattern)
    count_invalidation()
    return removed


def cache_namespace_drop(*, namespace: str) -> int:
    """Drop a whole namespace (`gen`, `topic`) in O(1) by bumping its version; returns the
    new version. The old entries become unreachable at once and expire by their TTL."""
    t = tier()
    t.sync(force=True)
    t.memory.delete_prefix(namespace + ":")
    if t.redis is None:
        return 0
    version = t.publish("ns", namespace)
    t.versions[namespace] = version
    count_invalidation()
    return version


def single_flight(
    key: str,
    compute: Callable[[], dict[str, Any]],
    *,
    wait_seconds: float = 30.0,
    store: bool = True,
    ttl: int | None = None,
    lock: FlightLock | None = None,
    keep_lock: bool = False,
) -> tuple[dict[str, Any], str | None]:
    """Run `compute` once for concurrent identical misses, across threads and processes.

    Returns (value, layer): `layer` is None if the value was computed here, else the
    cache layer it was taken from, as a hit names it: "memory" for a value another thread
    of this process computed or fetched (handed over in memory), the hit's own layer for
    one another process stored (read from Redis, or from memory if a thread here promoted
    it first).

    The first caller takes a Redis lock (expiring after `wait_seconds`), computes, stores
    the value with `cache_set` (unless `store=False`: then it must be stored by the caller
    for other processes to see it) and releases the lock. Other threads of the same
    process wait for the leader in-process; other processes poll the cache until the
    value appears or the lock is gone (then one of them takes over). A waiter that has
    waited `wait_seconds` computes on its own. If the leader's `compute` raises, its
    in-process waiters get the same exception and the lock is released at once so that
    another process may try.

    `lock`: the lock a miss's admission took (`cache_probe_found`); its holder computes at
    once (a thread of this process that got here first is waiting for its answer). With
    `keep_lock=True` that value is neither stored nor the lock released: the caller does
    both with `cache_store_later(key, value, lock=lock)`, whose write can ride in another
    round trip (the lock is still released at once if `compute` raises).
    """
    t = tier()
    with t._flights_lock:
        flight = t.flights.get(key)
        leader = flight is None
        if flight is None:
            flight = t.flights[key] = Flight()
    if not leader and lock is None:
        if flight.done.wait(wait_seconds):
            if flight.error is not None:
                # Each waiter raises an error of its own, which its request may annotate
                # (its own rate-limit headers) without touching the others'.
                raise copy.copy(flight.error) from flight.error
            return json.loads(flight.value or "null"), "memory"
        return _compute_and_store(key, compute, store=store, ttl=ttl), None
    try:
        layer: str | None = None
        if lock is not None:
            value = _compute_locked(key, compute, lock, store=store, ttl=ttl, keep_lock=keep_lock)
        else:
            value, layer = _single_flight_shared(
                key, compute, wait_seconds=wait_seconds, store=store, ttl=ttl
            )
        if leader:
            flight.value = encode(value)
        return value, layer
    except BaseException as exc:
        if leader:
            flight.error = exc
        raise
    finally:
        if leader:
            with t._flights_lock:
                t.flights.pop(key, None)
            flight.done.set()


def _compute_locked(
    key: str,
    compute: Callable[[], dict[str, Any]],
    lock: FlightLock,
    *,
    store: bool,
    ttl: int | None,
    keep_lock: bool = False,
) -> dict[str, Any]:
    """Compute under our lock; store the value and release the lock in one round trip
    (or release it at once if `compute` raises). `keep_lock`: the caller stores the value
    and releases the lock (`cache_store_later`)."""
    try:
        value = compute()
    except BaseException:
        _release(tier(), lock.key, lock.token)
        raise
    if keep_lock:
        return value
    if store:
        _store(key, value, ttl=ttl, lock=lock)
    else:
        _release(tier(), lock.key, lock.token)
    return value


def _compute_and_store(
    key: str, compute: Callable[[], dict[str, Any]], *, store: bool, ttl: int | None
) -> dict[str, Any]:
    value = compute()
    if store:
        cache_set(key, value, ttl=ttl)
    return value


def _fresh_hit(key: str, raw: bytes | None) -> CacheHit | None:
    """The answer another caller just stored (counted as a hit, promoted), else None."""
    if raw is None or time.time() >= _parse(raw)[0]:
        return None
    return cache_get(key)


def _single_flight_shared(
    key: str,
    compute: Callable[[], dict[str, Any]],
    *,
    wait_seconds: float,
    store: bool,
    ttl: int | None,
) -> tuple[dict[str, Any], str | None]:
    t = tier()
    t.sync()
    if not t.available():
        return _compute_and_store(key, compute, store=store, ttl=ttl), None
    lock_key = t.k("lock:" + key)
    entry_key = t.entry_key(key)
    token = new_token()
    lock_ms = max(1, int(wait_seconds * 1000))
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        replies = _pipe(t, [("set", lock_key, token, lock_ms), ("get", entry_key)])
        if replies is None:
            break  # Redis failed: no coordination possible, compute on our own
        acquired, raw = replies
        hit = _fresh_hit(key, raw)
        if acquired:
            if hit is not None:  # stored between our miss and our lock
                _release(t, lock_key, token)
                return hit.value, hit.layer
            lock = FlightLock(lock_key, token)
            return _compute_locked(key, compute, lock, store=store, ttl=ttl), None
        if hit is not None:
            return hit.value, hit.layer
        # Someone else holds the lock: wait for its answer or for the lock to go away
        # (then loop to take it over).
        delay = 0.005
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            replies = _pipe(t, [("exists", lock_key), ("get", entry_key)])
            if replies is None:
                break
            held, raw = replies
            hit = _fresh_hit(key, raw)
            if hit is not None:
                return hit.value, hit.layer
            if not held:
                break
        if replies is None:
            break
    return _compute_and_store(key, compute, store=store, ttl=ttl), None


def _pipe(t: Any, commands: list[tuple[Any, ...]]) -> list[Any] | None:
    """Run a few commands in one round trip; None when Redis is away or failed (told to the
    tier: `CacheTier.failed`)."""
    if not t.available():
        return None
    try:
        pipe = t.redis.pipeline(transaction=False)
        for name, *args in commands:
            if name == "set":
                pipe.set(args[0], args[1], nx=True, px=args[2])
            else:
                getattr(pipe, name)(*args)
        replies = list(pipe.execute())
    except Exception as exc:
        t.failed(exc, "single flight")
        return None
    t.answered()
    return replies


def _release(t: Any, lock_key: str, token: str) -> None:
    """Release our single-flight lock; while Redis is away, it expires on its own."""
    if not t.available():
        return
    try:
        t.release_lock(lock_key, token)
    except Exception as exc:  # the lock expires on its own
        t.failed(exc, "single flight: lock release")
    else:
        t.answered()


def popularity_bump(topic: str, *, count: int = 1) -> None:
    """Count `count` requests for a topic (buffered; in Redis within a quarter second)."""
    t = tier()
    with t._stats_lock:
        t.popularity[topic_normalise(topic)] += count
    t.sync()


def popularity_top(*, limit: int = POPULAR_LIMIT, min_count: int = 1) -> list[tuple[str, int]]:
    """The most requested topics with their counts, most requested first."""
    t = tier()
    t.sync(force=True)
    if t.redis is None:
        return [(k, n) for k, n in t.local_popularity.most_common(limit) if n >= min_count]
    rows = t.redis.zrevrangebyscore(
        t.k("pop"), "+inf", min_count, start=0, num=limit, withscores=True
    )
    return [(name.decode(), int(score)) for name, score in rows]


def popularity_decay(*, factor: float = 0.5) -> None:
    """Multiply every topic's count by `factor` (0..1), so that popularity fades."""
    t = tier()
    t.sync(force=True)
    if t.redis is None:
        for name in list(t.local_popularity):
            t.local_popularity[name] = int(t.local_popularity[name] * factor)
        return
    t.redis.zunionstore(t.k("pop"), {t.k("pop"): factor})
    t.redis.zremrangebyscore(t.k("pop"), "-inf", "(1")


def cache_stats() -> dict[str, Any]:
    """Counts of every worker (`memory.size` is this process's): the API.md stats shape."""
    t = tier()
    t.sync(force=True)
    if t.redis is None:
        totals = {name: t.local_totals[name] for name in STAT_FIELDS}
    else:
        raw = t.redis.hgetall(t.k("stats"))
        totals = {name: int(raw.get(name.encode(), 0)) for name in STAT_FIELDS}
    looked_up = totals["redis_hits"] + totals["redis_misses"]
    return {
        "memory": {
            "size": len(t.memory),
            "max_size": t.memory.max_size,
            "hits": totals["memory_hits"],
            "misses": totals["memory_misses"],
        },
        "redis": {
            "hits": totals["redis_hits"],
            "misses": totals["redis_misses"],
            "hit_rate": round(totals["redis_hits"] / looked_up, 4) if looked_up else 0.0,
        },
        "stale": {"hits": totals["stale_hits"], "misses": totals["stale_misses"]},
        "sets": totals["sets"],
        "popular": [[name, n] for name, n in popularity_top()],
    }


def cache_stats_reset() -> None:
    """Zero the shared hit/miss counters (popularity is kept)."""
    t = tier()
    t.sync(force=True)
    t.local_totals.clear()
    if t.redis is not None:
        t.redis.delete(t.k("stats"))


def cache_local_reset() -> None:
    """Forget this process's memory layer and sync state (tests; after a Redis flush)."""
    tier_reset()

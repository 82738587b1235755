"""The two-layer cache tier of one process: the memory layer over the shared Redis layer.

Redis layout (P = settings.REDIS_KEY_PREFIX):

- ``P:c:e:<ns>:<version>:<rest>`` one entry per logical key ``<ns>:<rest>``: a header
  ``"<fresh_until> <stale_until>"``, a newline, then the JSON answer. The entry lives in
  Redis until ``stale_until`` (fresh TTL + QUOTA_FALLBACK_CACHE_TTL); a normal look-up
  treats it as a miss once ``fresh_until`` has passed, so the stale copy costs no second
  key and is only ever read by `get_stale` (the quota fallback).
- ``P:c:ns`` hash namespace -> version. Dropping a namespace is one HINCRBY: every old
  entry becomes unreachable at once and expires on its own (O(1), no scan).
- ``P:c:seq`` + ``P:c:inv`` the invalidation log: a counter and a capped stream whose
  entry ids are the counter values (``<seq>-1``), written by one Lua script so that ids
  are gap-free. Each entry is ``k`` (key|pattern|ns) and ``a`` (its argument).
- ``P:c:stats`` hash of hit/miss counters summed over all processes; ``P:c:pop`` sorted
  set of requests per normalised topic; ``P:c:lock:<key>`` single-flight locks (taken by
  a miss's admission script, which also looks the entry up: quotas' CacheGate; a leader
  stores its answer and releases its lock in one script, sent with its settlement).

Why a polled log and not pub/sub: a memory hit must cost no Redis round trip, and a
gunicorn worker has no thread of its own to listen on a subscription (a listener thread
would also have to survive forks and reconnects, and messages sent while it reconnects
would be lost). Instead every look-up first calls `sync()`, which does nothing unless
INVALIDATION_POLL_SECONDS (0.25 s) have passed since the last sync; then ONE transaction
reads the log counter, the entries after the last one applied and the namespace versions,
and flushes this process's buffered stats and popularity counts. A worker therefore serves
at most one extra round trip per 0.25 s, however many hits it answers, and no look-up
after an invalidation + 0.25 s (+ one round trip) can see the dropped entry. That holds for
an answer in flight too (read from Redis, or written there, by a request as the purge runs):
if this process applies an invalidation before putting it in memory, it is not put there
(MemoryLayer.put), since the invalidation will not be applied again. A gap in the log (the
stream was trimmed, or Redis was flushed: the counter went backwards) clears the whole
memory layer, which is always safe.

Without REDIS_URL (the embedded default) the tier is the memory layer alone. So it is while
its Redis server is away (config.outages: a call of the tier, or of any other part of the
worker, found it unreachable or hung): every look-up misses past the memory layer, every
store stays in memory, single flight gives way, the sync waits, until the check (a PING
from a thread of the worker's own) finds Redis back.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from caching.memory import MemoryLayer
from caching.patterns import KeyPattern, PatternError, pattern_compile
from config.outages import REDIS_DOWN, Outage, OutageNotice, redis_outage
from config.redis_calls import ScriptCall
from health.metrics import CACHE_OPERATIONS

logger = logging.getLogger("tollgate.caching")

INVALIDATION_POLL_SECONDS = 0.25
STREAM_MAXLEN = 1000
SYNC_BATCH = 500
SCAN_COUNT = 500
REDIS_RETRY_SECONDS = 1.0
STAT_FIELDS = (
    "memory_hits",
    "memory_misses",
    "redis_hits",
    "redis_misses",
    "stale_hits",
    "stale_misses",
    "sets",
)
_GLOB_CHARS = frozenset("*?[]\\")

# KEYS: seq, stream, namespaces. ARGV: maxlen, kind, arg.
_PUBLISH_LUA = """
local version = 0
if ARGV[2] == 'ns' then
  version = redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], seq .. '-1', 'k', ARGV[2], 'a', ARGV[3])
return {seq, version}
"""
# KEYS: lock. ARGV: token. Deletes the lock only if we still own it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: entry, lock. ARGV: entry value, its TTL in ms, token. A single flight's leader
# stores its answer and releases its lock (if it still owns it) in one round trip.
_STORE_RELEASE_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""

# What the tier says of a Redis outage, once as it begins and once as it ends.
_redis_away = OutageNotice(
    logger,
    began="cache tier on this worker's memory alone while Redis is away",
    ended="cache tier back on Redis after %.1f s",
)

_METRIC = {
    (layer, result): CACHE_OPERATIONS.labels(layer=layer, result=result)
    for layer in ("memory", "redis", "stale")
    for result in ("hit", "miss", "set", "error", "invalidate")
}


def count_invalidation() -> None:
    _METRIC[("redis", "invalidate")].inc()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_CHARS else c for c in text)


def split_key(key: str) -> tuple[str, str]:
    """`<ns>:<rest>` -> (ns, rest). Raises ValueError for a key without a namespace."""
    ns, sep, rest = key.partition(":")
    if not sep or not ns:
        raise ValueError(f"cache keys look like '<namespace>:<rest>', got {key!r}")
    return ns, rest


def encode(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class Flight:
    """An in-process single flight: the leader's result, handed to waiting threads."""

    done: threading.Event = field(default_factory=threading.Event)
    value: str | None = None  # the encoded answer: each waiter decodes its own copy
    error: BaseException | None = None


class CacheTier:
    """Memory layer + Redis layer + invalidation sync + buffered stats of one process."""

    def __init__(self) -> None:
        self.memory = MemoryLayer(max_size=settings.CACHE_MEMORY_MAX_SIZE)
        self.prefix = f"{settings.REDIS_KEY_PREFIX}:c:"
        self._redis: Any = None
        self.outage: Outage | None = None  # its Redis server's, once `redis` is first used
        self._scripts: dict[str, Any] = {}
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._sync_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._flights_lock = threading.Lock()
        self.flights: dict[str, Flight] = {}
        self.versions: dict[str, int] = {}
        self.last_seq: int | None = None
        self.last_sync = -1e18
        # After an error Redis answered with (out of memory, read-only...), not an outage of
        # the server: the tier alone leaves Redis for REDIS_RETRY_SECONDS.
        self.down_until = 0.0
        self.stats: Counter[str] = Counter()
        self.popularity: Counter[str] = Counter()
        # Without Redis the totals live here; with Redis, only until the next sync.
        self.local_totals: Counter[str] = Counter()
        self.local_popularity: Counter[str] = Counter()

    def after_fork(self) -> None:
        """A forked child inherits no locks, flights or unflushed counts from its parent."""
        self._init_process_state()
        self.memory = MemoryLayer(max_size=self.memory.max_size)

    # --- Redis plumbing -------------------------------------------------------------------

    @property
    def redis(self) -> Any:
        """The raw redis-py client of the default django-redis cache, or None (no Redis)."""
        if self._redis is None and settings.REDIS_URL:
            from django_redis import get_redis_connection

            self._redis = get_redis_connection("default")
            self.outage = redis_outage(self._redis)
            self._scripts = {
                "publish": self._redis.register_script(_PUBLISH_LUA),
                "release": self._redis.register_script(_RELEASE_LUA),
                "store_release": self._redis.register_script(_STORE_RELEASE_LUA),
            }
        return self._redis

    def available(self) -> bool:
        """Redis is configured, not away (`Outage.away`: its server's check has not found it
        back yet) and did not refuse a call of the tier in the last REDIS_RETRY_SECONDS.
        The caller then asks Redis and tells `failed` or `answered`."""
        if self.redis is None or self.outage is None or time.monotonic() < self.down_until:
            return False
        return not _redis_away.away(self.outage)

    def failed(self, exc: BaseException, what: str) -> None:
        """A Redis call of the tier failed. Unanswered (refused, timed out): the server's
        outage, which every part of the worker then waits out, said once. Answered with an
        error: logged, and the tier alone runs on memory for REDIS_RETRY_SECONDS. Either
        way an outage costs one slow call per second at most, not one per look-up."""
        if isinstance(exc, REDIS_DOWN) and self.outage is not None:
            _redis_away.failed(self.outage, exc)
            return
        logger.warning("%s failed", what, exc_info=exc)
        self.down_until = time.monotonic() + REDIS_RETRY_SECONDS

    def answered(self) -> None:
        """A Redis call of the tier was answered: an outage of its server is over."""
        if self.outage is not None:
            _redis_away.answered(self.outage)

    def k(self, name: str) -> str:
        return self.prefix + name

    def entry_key(self, key: str) -> str:
        ns, rest = split_key(key)
        return f"{self.prefix}e:{ns}:{self.versions.get(ns, 0)}:{rest}"

    def count(self, name: str, layer: str, result: str) -> None:
        _METRIC[(layer, result)].inc()
        with self._stats_lock:
            self.stats[name] += 1

    # --- invalidation sync ------------------------------------------------------------------

    def sync(self, *, force: bool = False) -> None:
        """Apply the invalidations published since the last sync and flush buffered counts.

        Does nothing unless INVALIDATION_POLL_SECONDS have passed (or `force`); never blocks
        on another thread's sync. Redis errors are logged and retried at the next poll.
        """
        redis = self.redis
        mono = time.monotonic()
        if redis is None:
            with self._stats_lock:
                self.local_totals.update(self.stats)
                self.local_popularity.update(self.popularity)
                self.local_popularity += Counter()  # drops zero and negative counts
                self.stats.clear()
                self.popularity.clear()
            return
        if not force and mono - self.last_sync < INVALIDATION_POLL_SECONDS:
            return
        if not self.available():
            return
        # The first sync of a process blocks: until it has run, namespace versions are unknown.
        if not self._sync_lock.acquire(blocking=force or self.last_seq is None):
            return
        try:
            if not self.available():  # Redis found away while waiting for the lock
                return
            self.last_sync = mono
            with self._stats_lock:
                stats, self.stats = self.stats, Counter()
                popularity, self.popularity = self.popularity, Counter()
            last_seq = self.last_seq
            pipe = redis.pipeline(transaction=True)
            pipe.get(self.k("seq"))
            pipe.hgetall(self.k("ns"))
            if last_seq is not None:
                pipe.xrange(self.k("inv"), min=f"({last_seq}-1", max="+", count=SYNC_BATCH)
            for name, n in stats.items():
                pipe.hincrby(self.k("stats"), name, n)
            for topic, n in popularity.items():
                if n:
                    pipe.zincrby(self.k("pop"), n, topic)
            try:
                replies = pipe.execute()
            except Exception as exc:  # a Redis outage must not fail a look-up
                self.failed(exc, "cache invalidation sync")
                with self._stats_lock:
                    self.stats.update(stats)
                    self.popularity.update(popularity)
                return
            self.answered()
            self._apply(replies, last_seq)
        finally:
            self._sync_lock.release()

    def _apply(self, replies: list[Any], last_seq: int | None) -> None:
        seq = int(replies[0] or 0)
        versions = {ns.decode(): int(v) for ns, v in replies[1].items()}
        for ns, version in versions.items():
            if self.versions.get(ns, 0) != version:
                self.memory.delete_prefix(ns + ":")
        for ns in set(self.versions) - set(versions):  # Redis lost the hash
            self.memory.delete_prefix(ns + ":")
        self.versions = versions
        if last_seq is None:
            self.memory.clear()  # nothing known about what happened before this process
        elif seq < last_seq:
            self.memory.clear()  # Redis was flushed or restarted
        elif seq > last_seq:
            entries = replies[2]
            expected = list(range(last_seq + 1, last_seq + 1 + len(entries)))
            got = [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]
            if got != expected or last_seq + len(entries) != seq:
                self.memory.clear()  # the log was trimmed past us, or too long to replay
            else:
                for _, fields in entries:
                    self._apply_entry(fields[b"k"].decode(), fields[b"a"].decode())
        self.last_seq = seq

    def _apply_entry(self, kind: str, arg: str) -> None:
        if kind == "key":
            self.memory.delete(arg.split("\x00"))
        elif kind == "pattern":
            try:
                self.memory.delete_matching(pattern_compile(arg).matches)
            except PatternError:  # from a release with another language: forget everything
                self.memory.clear()
        elif kind == "ns":
            self.memory.delete_prefix(arg + ":")

    def publish(self, kind: str, arg: str) -> int:
        """Append an invalidation to the log; returns the namespace's new version for 'ns'."""
        self.redis  # noqa: B018 - loads the scripts
        _, version = self._scripts["publish"](
            keys=[self.k("seq"), self.k("inv"), self.k("ns")], args=[STREAM_MAXLEN, kind, arg]
        )
        return int(version)

    def release_lock(self, lock_key: str, token: str) -> None:
        self.redis  # noqa: B018 - loads the scripts
        self._scripts["release"](keys=[lock_key], args=[token])

    def store_and_release(
        self, entry_key: str, raw: bytes, px: int, lock_key: str, token: str
    ) -> None:
        """SET the entry (PX `px`) and release our single-flight lock: one round trip."""
        self.redis  # noqa: B018 - loads the scripts
        self._scripts["store_release"](keys=[entry_key, lock_key], args=[raw, px, token])

    def store_and_release_call(
        self, entry_key: str, raw: bytes, px: int, lock_key: str, token: str
    ) -> ScriptCall:
        """`store_and_release` as a call to send in another service's round trip."""
        self.redis  # noqa: B018 - loads the scripts
        return ScriptCall(
            self._scripts["store_release"], keys=[entry_key, lock_key], args=[raw, px, token]
        )

    # --- scanning ---------------------------------------------------------------------------

    def scan_matching(self, pattern: KeyPattern | str) -> Iterator[list[str]]:
        """Batches of current-version Redis entry keys whose logical key matches `pattern`
        (compiled here if given as text; PatternError if it does not parse).

        A pattern with a namespace written out (`topic:python*`) is one SCAN over that
        namespace's current version, narrowed by MATCH to the pattern's literal start in
        any case; any other pattern scans all entries. Each key is then checked here.
        SCAN, never KEYS: the server is never blocked for the whole key space.
        """
        compiled = pattern_compile(pattern) if isinstance(pattern, str) else pattern
        head = len(self.prefix) + 2  # past "<prefix>e:"
        if compiled.namespace is not None:
            ns = compiled.namespace
            version = str(self.versions.get(ns, 0))
            match = f"{_glob_escape(self.prefix)}e:{_glob_escape(ns)}:{version}:"
        else:
            version = None
            match = f"{_glob_escape(self.prefix)}e:"
        match += compiled.scan_prefix + "*"

        def check(raw: str) -> bool:
            ens, ver, erest = raw[head:].split(":", 2)
            current = str(self.versions.get(ens, 0)) if version is None else version
            return ver == current and compiled.matches(f"{ens}:{erest}")

        batch: list[str] = []
        for raw_key in self.redis.scan_iter(match=match, count=SCAN_COUNT):
            name = raw_key.decode()
            if check(name):
                batch.append(name)
            if len(batch) >= SCAN_COUNT:
                yield batch
                batch = []
        if batch:
            yield batch


_tier: CacheTier | None = None
_tier_lock = threading.Lock()


def tier() -> CacheTier:
    """This process's tier, created on first use."""
    global _tier  # noqa: PLW0603 - one tier per process, created lazily after settings load
    if _tier is None:
        with _tier_lock:
            if _tier is None:
                _tier = CacheTier()
    return _tier


def tier_reset() -> None:
    """Forget everything this process holds (memory, versions); settings are re-read.
    Buffered counts are flushed to Redis first (best effort)."""
    global _tier  # noqa: PLW0603
    with _tier_lock:
        if _tier is not None and _tier._redis is not None and _tier.available():
            _tier.sync(force=True)
        _tier = None


def _after_fork_in_child() -> None:
    if _tier is not None:
        _tier.after_fork()


def _flush_at_exit() -> None:
    if _tier is not None and _tier._redis is not None and _tier.available():
        _tier.sync(force=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_flush_at_exit)


def new_token() -> str:
    return uuid.uuid4().hex

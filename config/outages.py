"""A backing service that one part of a worker found unreachable.

Every caller leaves the service alone for `retry_seconds` after each failure (a service that
hangs would otherwise cost every request its timeout); then exactly one caller, the probe,
asks it again while the others go on leaving it alone until the probe has its answer. An
Outage given a `check` (Redis's: a PING) has no caller probe: a thread of its own runs the
check once per back-off for as long as the outage lasts, so that no request waits out the
timeout of a service still hung. The outage is said once when it begins and once when it
ends, not once per request.

Authentication's and the ledger's PostgreSQL each keep an Outage of their own. A Redis
server has one per process, whatever its database numbers and clients (`redis_outage`):
the quota engine, the circuit breaker, the cache tier (look-ups, stores, single flight,
invalidation sync), Idempotency-Keys and the authentication throttle all skip a server that
any of them found away, each taking its own degraded path, so that a hung Redis costs a
request at most one socket timeout (bench/outage.py, `redis-freeze`). Each of those parts
says what it does meanwhile with an OutageNotice of its own; the quota engine also
rebuilds its counters when Redis is back (quotas.services.admission).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A Redis call that got no answer: the server is unreachable, hung, or loading its data set
# (BusyLoadingError is a ConnectionError). Errors the server answers with (out of memory,
# read-only, a script's error) are not an outage of the server: every part handles those.
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)

logger = logging.getLogger("tollgate.redis")


class Outage:
    """One backing service's outage, as this process sees it (see the module docstring)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        began: str,
        ended: str,
        retry_seconds: float = 1.0,
        check: Callable[[], object] | None = None,
    ) -> None:
        """`began`: the message (with %-arguments given to `failed`) when the first failure
        is seen; `ended`: the one (with the outage's length in seconds) when the service
        answers again. `check`: asks the service, raising if it does not answer; with it,
        the checking thread probes instead of a caller."""
        self.logger, self.began, self.ended = logger, began, ended
        self.retry_seconds = retry_seconds
        self.check = check
        self.since: float | None = None  # the outage's start, while there is one
        self.retry_at = 0.0  # time.monotonic() before which the service is not asked
        self.prober: int | None = None  # the thread that asks it again, until it reports
        self.failures = 0  # calls that found the service away, in this process's life
        self._lock = threading.Lock()
        self._checker: threading.Thread | None = None
        _every.add(self)

    def away(self) -> bool:
        """True while the service is to be left alone. Once the back-off has passed, False
        for exactly one caller (its thread), the probe, which asks the service and reports
        with `failed` or `answered`; True for the others until it has, or until another
        back-off has passed if it never does. The probe's thread may make several calls.

        With a `check`, True for every caller until the checking thread has found the
        service back.

        A healthy service costs two comparisons, no lock."""
        now = time.monotonic()
        if now < self.retry_at:
            return self.prober != threading.get_ident()
        if self.since is None:
            return False
        if self.check is not None:
            self._checking()
            return True
        with self._lock:
            if self.since is None:
                return False
            if now < self.retry_at:  # another caller took the probe meanwhile
                return self.prober != threading.get_ident()
            self.retry_at = now + self.retry_seconds
            self.prober = threading.get_ident()
            return False

    def failed(self, *args: Any) -> None:
        """A call found the service away. The next probe comes `retry_seconds` after this
        failure, or, when this was the probe, after the probe began: one try a second,
        not one a second plus the timeout it waited out."""
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            if self.prober != threading.get_ident() or now >= self.retry_at:
                self.retry_at = now + self.retry_seconds
            self.prober = None
            if self.since is not None:
                return
            self.since = now
        self.logger.warning(self.began, *args)
        if self.check is not None:
            self._checking()

    def _checking(self) -> None:
        """Start the checking thread unless it runs (it ends with the outage)."""
        checker = self._checker
        if checker is not None and checker.is_alive():
            return
        with self._lock:
            checker = self._checker
            if self.since is None or (checker is not None and checker.is_alive()):
                return
            self._checker = threading.Thread(
                target=self._check_until_answered,
                args=(self.check,),
                name="outage-check",
                daemon=True,
            )
            self._checker.start()

    def _check_until_answered(self, check: Callable[[], object]) -> None:
        """The checking thread: `check` once per back-off until the service answers."""
        while self.since is not None:
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                # A short nap, not the whole back-off: the outage may end, or its back-off
                # be cut short (a test), meanwhile.
                time.sleep(min(wait, 0.05))
                continue
            with self._lock:
                if self.since is None:
                    return
                self.retry_at = time.monotonic() + self.retry_seconds
                self.prober = threading.get_ident()
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - whatever it is, the service is still away
                self.failed(exc)
            else:
                self.answered()

    def answered(self) -> None:
        """A call was answered: the outage is over. Not for an answer that comes during the
        back-off to a call other than the probe's: that call was sent before the failure
        (a server shutting down still answers what it had read), and proves nothing."""
        if self.since is None:
            return
        with self._lock:
            since = self.since
            if since is None:
                return
            if time.monotonic() < self.retry_at and self.prober != threading.get_ident():
                return
            self.since, self.retry_at, self.prober = None, 0.0, None
        self.logger.warning(self.ended, time.monotonic() - since)

    def reset(self) -> None:
        """Forget the outage; a checking thread still running ends at its next look."""
        with self._lock:
            self.since, self.retry_at, self.prober = None, 0.0, None
            self.failures = 0


class OutageNotice:
    """What one part of a worker says of an outage it shares with the others (a Redis
    server's): once that it began, when the part first failed or skipped the service for
    it, and once that it ended, at the part's first call the service answered again. The
    back-off and the probe are the shared Outage's; the part passes it to each call, since
    which server that is follows the settings."""

    def __init__(self, logger: logging.Logger, *, began: str, ended: str) -> None:
        """`began`: the message; `ended`: the one with the part's outage length in seconds."""
        self.logger, self.began, self.ended = logger, began, ended
        self.since: float | None = None
        self._lock = threading.Lock()
        _notices.add(self)

    def away(self, outage: Outage) -> bool:
        """`outage.away()`, and the part's notice that it leaves the service alone."""
        if outage.away():
            self._begin()
            return True
        return False

    def failed(self, outage: Outage, *args: Any) -> None:
        outage.failed(*args)
        self._begin()

    def answered(self, outage: Outage) -> None:
        outage.answered()
        if self.since is None or outage.since is not None:
            return
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            self.logger.warning(self.ended, time.monotonic() - since)

    def _begin(self) -> None:
        if self.since is not None:
            return
        with self._lock:
            if self.since is not None:
                return
            self.since = time.monotonic()
        self.logger.warning(self.began)

    def reset(self) -> None:
        self.since = None


_every: weakref.WeakSet[Outage] = weakref.WeakSet()
_notices: weakref.WeakSet[OutageNotice] = weakref.WeakSet()
_redis_servers: dict[str, Outage] = {}
_redis_lock = threading.Lock()


def redis_server(client: Any) -> str:
    """The server a redis-py client talks to: "host:port", or its unix socket's path. Not
    the URL: two database numbers of one server, or two clients of it, are one server, and
    a server that hangs hangs for all of them."""
    kwargs = client.connection_pool.connection_kwargs
    path = kwargs.get("path")
    if path:
        return str(path)
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def redis_outage(client: Any) -> Outage:
    """The Outage of the Redis server `client` (redis-py) talks to, shared by every part of
    this process that uses that server (see the module's docstring)."""
    server = redis_server(client)
    outage = _redis_servers.get(server)
    if outage is None:
        with _redis_lock:
            outage = _redis_servers.get(server)
            if outage is None:
                outage = Outage(
                    logger,
                    began=f"Redis {server} unreachable (%s): every part of this worker leaves "
                    "it alone, and a PING tries it again each second",
                    ended=f"Redis {server} answers again after %.1f s",
                    check=client.ping,
                )
                _redis_servers[server] = outage
    return outage


def default_redis_outage() -> Outage | None:
    """The Outage of the Redis behind Django's default cache (REDIS_URL), or None without
    Redis (the embedded default)."""
    from django.conf import settings

    if not settings.REDIS_URL:
        return None
    from django_redis import get_redis_connection

    try:
        return redis_outage(get_redis_connection("default"))
    except NotImplementedError:  # the default cache is not django-redis's
        return None


def redis_unanswered(exc: BaseException) -> bool:
    """Whether `exc` is a Redis call that got no answer: one of REDIS_DOWN, from redis-py or
    wrapped by Django's cache (django-redis raises ConnectionInterrupted from it)."""
    return isinstance(exc, REDIS_DOWN) or isinstance(exc.__cause__, REDIS_DOWN)


def _after_fork_in_child() -> None:
    """A forked worker starts with no outage and with locks no other thread holds."""
    for outage in list(_every):
        outage._lock = threading.Lock()
        outage.reset()
    for notice in list(_notices):
        notice._lock = threading.Lock()
        notice.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def outages_reset() -> None:
    """Forget every outage this process has seen (a test's fresh start)."""
    for outage in list(_every):
        outage.reset()
    for notice in list(_notices):
        notice.reset()

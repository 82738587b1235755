"""One run at a time per job: a short Redis lock kept alive by its run.

The lock lives `JOB_LOCK_SECONDS` (60) and a daemon thread of the run renews it every third
of that, however long an item waits on its provider. A worker that dies (SIGKILL, OOM, a
lost node) stops renewing, so its lock is gone at most `JOB_LOCK_SECONDS` later and the
sweep or a redelivered message runs the job again; a run that is alive keeps it for as long
as it lasts. The lock is redis-py's `Lock`: it holds a token of its own run, and renewing
and releasing are token-checked scripts, so a run whose lock expired (a stalled process, a
Redis outage longer than the lock) cannot extend or delete the lock another run now holds;
it learns it lost the job instead (`renew` is False, `lost` is True).

The key is the one the cache alias gives `job-run:<id>` and the token a decimal number, so
the workers and sweep of the release before this one (which used `cache.add` and
`cache.get` on that key) and of this one exclude each other during a rolling deploy.
Without Redis (the embedded default, tasks run inline) the lock is held in this process.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from django.conf import settings
from django.core.cache import cache
from redis.exceptions import LockError, LockNotOwnedError, RedisError

logger = logging.getLogger("tollgate.jobs")

# Jobs held by this process, when there is no Redis to hold them in.
_local_held: set[str] = set()
_local_guard = threading.Lock()


def job_lock_key(job_id: object) -> str:
    """The Redis key of the job's lock."""
    return str(cache.make_key(f"job-run:{job_id}"))


def _redis() -> Any:
    from django_redis import get_redis_connection

    return get_redis_connection("default")


def job_lock_held(*, job_id: object) -> bool:
    """Whether some run holds the job's lock (alive, or dead less than the lock's life ago).
    Raises redis-py's RedisError when Redis cannot be asked."""
    if not settings.REDIS_URL:
        with _local_guard:
            return str(job_id) in _local_held
    return bool(_redis().exists(job_lock_key(job_id)))


class JobLock:
    """The lock of one run of one job: `acquire` it (False: another run holds the job), then
    `release` it when the run ends, whatever the outcome. While held, a daemon thread renews
    it every `ttl / 3` seconds. `ttl` is in seconds, `JOB_LOCK_SECONDS` when None.

    A renewal that fails on a Redis error is tried again at the next beat (the lock outlives
    two missed beats); one that finds the lock gone or held by another token marks the lock
    `lost` and stops renewing, and the run should stop before its next item.
    """

    def __init__(self, job_id: object, *, ttl: float | None = None) -> None:
        self.job_id = str(job_id)
        self.ttl = float(ttl if ttl is not None else settings.JOB_LOCK_SECONDS)
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock: Any = None  # redis.lock.Lock, while held in Redis
        self._local = False  # held in this process (no Redis)

    @property
    def lost(self) -> bool:
        """True once a renewal found that this run no longer holds the job."""
        return self._lost.is_set()

    def acquire(self, *, renew: bool = True) -> bool:
        """Take the job's lock; False when another run holds it. `renew=False` takes it
        without the renewing thread (a run that dies at once, as tests need).
        Raises redis-py's RedisError when Redis cannot be reached."""
        if not settings.REDIS_URL:
            with _local_guard:
                if self.job_id in _local_held:
                    return False
                _local_held.add(self.job_id)
            self._local = True
            return True
        from redis.lock import Lock

        # Not thread-local: the renewing thread uses the token this thread acquired with.
        lock = Lock(_redis(), job_lock_key(self.job_id), timeout=self.ttl, thread_local=False)
        if not lock.acquire(blocking=False, token=str(uuid.uuid4().int)):
            return False
        self._lock = lock
        if renew:
            self._thread = threading.Thread(
                target=self._renew_until_stopped, name=f"job-lock-{self.job_id}", daemon=True
            )
            self._thread.start()
        return True

    def renew(self) -> bool:
        """Give the lock its full life again if this run still holds it. False when it does
        not (the lock expired, or another run took it); True also when Redis could not be
        asked, since the lock may well still be ours."""
        lock = self._lock
        if lock is None or self.lost:
            return self._local
        try:
            lock.reacquire()
        except LockNotOwnedError:
            logger.warning("job %s: this run lost its lock; another run may hold it", self.job_id)
            self._lost.set()
            return False
        except LockError:  # released meanwhile: the run is over
            return False
        except RedisError:
            logger.warning("job %s: the lock could not be renewed", self.job_id, exc_info=True)
        return True

    def release(self) -> None:
        """Stop renewing and free the job, unless another run holds it by now. Never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._local:
            self._local = False
            with _local_guard:
                _local_held.discard(self.job_id)
            return
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            lock.release()
        except LockNotOwnedError:
            pass  # expired, perhaps taken by another run: theirs now
        except RedisError:
            logger.warning("job %s: the lock could not be released", self.job_id, exc_info=True)

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.renew():
                return

"""The lock of a job's run (generation/job_lock.py) against the real Redis: renewed while its
run is alive, gone soon after its run stops renewing, and never extended or released by a
run that lost it. The runs of real jobs are in test_jobs.py."""

from __future__ import annotations

import time
import uuid

import pytest

from config.tests.waiting import wait_until
from generation.job_lock import JobLock, job_lock_held, job_lock_key

TTL = 1.0  # seconds; renewed every third of a second


@pytest.fixture
def job_id(redis_conn):
    return str(uuid.uuid4())


def test_job_lock_renewed_by_its_run_outlives_its_ttl_and_keeps_others_out(job_id):
    run = JobLock(job_id, ttl=TTL)
    assert run.acquire()

    time.sleep(3 * TTL)  # three lives of the lock: only renewals kept it

    assert job_lock_held(job_id=job_id)
    assert not JobLock(job_id, ttl=TTL).acquire(renew=False)
    assert run.renew()
    assert not run.lost
    run.release()
    assert not job_lock_held(job_id=job_id)
    again = JobLock(job_id, ttl=TTL)
    assert again.acquire(renew=False)
    again.release()


def test_job_lock_of_a_run_that_stopped_renewing_expires_and_another_run_takes_it(job_id):
    dead = JobLock(job_id, ttl=TTL)
    assert dead.acquire(renew=False)  # its worker is gone: nothing renews it
    assert not JobLock(job_id, ttl=TTL).acquire(renew=False)

    wait_until(lambda: not job_lock_held(job_id=job_id), timeout=10)

    assert JobLock(job_id, ttl=TTL).acquire(renew=False)


def test_job_lock_stale_run_cannot_renew_or_release_the_lock_another_run_took(job_id, redis_conn):
    stale = JobLock(job_id, ttl=TTL)
    assert stale.acquire(renew=False)  # a run stalled past its lock's life
    wait_until(lambda: not job_lock_held(job_id=job_id), timeout=10)
    other = JobLock(job_id, ttl=30)
    assert other.acquire(renew=False)
    key = job_lock_key(job_id)
    token = redis_conn.get(key)

    assert not stale.renew()
    assert stale.lost
    stale.release()

    assert redis_conn.get(key) == token
    assert redis_conn.pttl(key) > 1000  # still the other run's 30 s, not the stale 1 s
    other.release()
    assert not job_lock_held(job_id=job_id)


def test_job_lock_renewing_thread_stops_when_another_run_holds_the_job(job_id, redis_conn):
    run = JobLock(job_id, ttl=TTL)
    assert run.acquire()
    # Redis forgot the lock (a failover, a flush) and another run took the job meanwhile.
    redis_conn.delete(job_lock_key(job_id))
    other = JobLock(job_id, ttl=30)
    assert other.acquire(renew=False)
    token = redis_conn.get(job_lock_key(job_id))

    wait_until(lambda: run.lost, timeout=10)

    assert not run.renew()
    run.release()
    assert redis_conn.get(job_lock_key(job_id)) == token
    assert redis_conn.pttl(job_lock_key(job_id)) > 1000
    other.release()


def test_job_lock_token_reads_as_held_through_the_cache_as_the_previous_release_read_it(
    job_id,
):
    from django.core.cache import cache

    run = JobLock(job_id, ttl=30)
    assert run.acquire(renew=False)

    # The previous release's sweep skipped a job whose `cache.get` was not None, and its run
    # took the job with `cache.add`: both see this release's lock.
    assert cache.get(f"job-run:{job_id}") is not None
    assert not cache.add(f"job-run:{job_id}", "previous-release-worker", 1860)
    run.release()
    assert cache.add(f"job-run:{job_id}", "previous-release-worker", 1860)
    assert not JobLock(job_id, ttl=30).acquire(renew=False)
    cache.delete(f"job-run:{job_id}")


def test_job_lock_without_redis_is_held_in_the_process(job_id, settings):
    settings.REDIS_URL = ""
    run = JobLock(job_id, ttl=TTL)
    assert run.acquire()
    assert job_lock_held(job_id=job_id)
    assert not JobLock(job_id, ttl=TTL).acquire()
    assert run.renew()

    run.release()

    assert not job_lock_held(job_id=job_id)
    again = JobLock(job_id, ttl=TTL)
    assert again.acquire(renew=False)
    again.release()

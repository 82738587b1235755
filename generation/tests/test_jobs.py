from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db.models import F

from config.tests.celery_fixtures import celery_worker  # noqa: F401
from config.tests.waiting import wait_until
from generation import jobs
from generation.models import Job, JobStatus
from quotas.models import UsageRecord, UserQuota
from quotas.services import key_create
from quotas.tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def owner_client(api_client, user):
    full_key, _ = key_create(user=user, name="jobs")
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {full_key}")
    return api_client


def job_status(job_id: str) -> Job:
    return Job.objects.get(pk=job_id)


def unique_topic() -> str:
    return f"Topic {uuid.uuid4().hex[:8]}"


@pytest.mark.usefixtures("celery_worker", "upstream_settings")
def test_job_through_worker_goes_from_queued_to_done(
    owner_client, user, openai_model, local_model, fake_upstream
):
    UserQuota.objects.create(user=user, requests_per_minute=100)
    topic = unique_topic()
    response = owner_client.post(
        "/api/v1/jobs",
        {"topic": topic, "subtopics": ["Variables", "Loops", "Functions"], "model": "gpt-test"},
        format="json",
    )
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["progress"] == {"done": 0, "total": 3, "percent": 0}
    assert body["result"] is None
    assert response["Location"] == f"/api/v1/jobs/{body['id']}"
    assert response["X-RateLimit-Limit-Requests"] == "100"

    wait_until(lambda: job_status(body["id"]).status == JobStatus.DONE)
    detail = owner_client.get(f"/api/v1/jobs/{body['id']}")

    assert detail.status_code == 200
    done = detail.json()
    assert done["status"] == "done"
    assert done["progress"] == {"done": 3, "total": 3, "percent": 100}
    items = done["result"]["items"]
    assert [i["subtopic"] for i in items] == ["Variables", "Loops", "Functions"]
    assert all(i["explanation"] and i["error"] is None for i in items)
    assert len(fake_upstream.requests) == 3
    rows = UsageRecord.objects.filter(request_id__startswith=f"job-{uuid.UUID(body['id']).hex}")
    assert rows.count() == 3
    assert Decimal(done["result"]["cost_usd"]) == sum(r.cost_usd for r in rows)
    assert done["result"]["usage"]["total_tokens"] == sum(
        r.prompt_tokens + r.completion_tokens for r in rows
    )


@pytest.mark.usefixtures("celery_worker", "upstream_settings")
def test_job_item_refused_for_quota_is_retried_not_failed(
    owner_client, user, openai_model, settings
):
    settings.JOB_RETRY_MAX_COUNTDOWN = 1
    UserQuota.objects.create(user=user, requests_per_minute=1)
    response = owner_client.post(
        "/api/v1/jobs",
        {"topic": unique_topic(), "subtopics": ["One", "Two"], "model": "gpt-test"},
        format="json",
    )
    job_id = response.json()["id"]

    waiting = wait_until(
        lambda: (j := job_status(job_id)).quota_retries >= 1 and j.status == "waiting" and j
    )
    assert waiting.done_items == 1
    assert waiting.error["code"] == "quota_exceeded"
    assert waiting.error["dimension"] == "requests_per_minute"
    assert waiting.retry_at is not None
    seen = owner_client.get(f"/api/v1/jobs/{job_id}").json()
    assert seen["status"] in ("waiting", "running")
    assert seen["progress"]["done"] == 1

    # The operator raises the limit: the next retry gets through and the job completes.
    UserQuota.objects.filter(user=user).update(requests_per_minute=10)
    UserQuota.objects.get(user=user).save()
    done = wait_until(lambda: (j := job_status(job_id)).status in ("done", "failed") and j)

    assert done.status == JobStatus.DONE
    assert done.error is None
    assert done.attempts >= 2
    assert [item["error"] for item in done.items] == [None, None]
    assert UsageRecord.objects.filter(request_id__startswith=f"job-{done.id.hex}").count() == 2


@pytest.mark.usefixtures("upstream_settings")
def test_job_run_again_after_done_changes_nothing(
    user, openai_model, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        job = jobs.job_create(
            user_id=user.pk, key_id=None, topic=unique_topic(), subtopics=["A"], model="gpt-test"
        )
    assert jobs.job_run(job_id=job.id) == "done"
    rows = UsageRecord.objects.count()

    assert jobs.job_run(job_id=job.id) == "done"
    job.refresh_from_db()
    assert job.attempts == 1
    assert UsageRecord.objects.count() == rows


@pytest.mark.usefixtures("upstream_settings")
def test_job_get_other_users_job_is_404_staff_can_read(
    owner_client, user, openai_model, api_client
):
    job = Job.objects.create(user=user, request={"topic": "t", "subtopics": ["a"], "model": "m"})
    stranger = UserFactory()
    staff = UserFactory(is_staff=True)

    from rest_framework.test import APIClient

    other = APIClient()
    other.force_authenticate(stranger)
    admin = APIClient()
    admin.force_authenticate(staff)

    assert owner_client.get(f"/api/v1/jobs/{job.id}").status_code == 200
    refused = other.get(f"/api/v1/jobs/{job.id}")
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "not_found"
    assert admin.get(f"/api/v1/jobs/{job.id}").status_code == 200
    assert owner_client.get(f"/api/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert APIClient().get(f"/api/v1/jobs/{job.id}").status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"topic": "t", "subtopics": []}, "subtopics"),
        ({"topic": "t", "subtopics": [f"s{i}" for i in range(21)]}, "subtopics"),
        ({"subtopics": ["a"]}, "topic"),
        ({"topic": "t", "subtopics": "not a list"}, "subtopics"),
        # As the synchronous endpoint: a number is not taken for a text.
        ({"topic": 123, "subtopics": ["a"]}, "topic"),
        ({"topic": "t", "subtopics": ["Channels", 42]}, "subtopics"),
    ],
)
def test_job_create_bad_body_is_400_and_queues_nothing(owner_client, body, field):
    response = owner_client.post("/api/v1/jobs", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert field in response.json()["error"]["fields"]
    assert not Job.objects.exists()


def test_job_create_unknown_model_is_400(owner_client):
    response = owner_client.post(
        "/api/v1/jobs", {"topic": "t", "subtopics": ["a"], "model": "no-such-model"}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert not Job.objects.exists()


def queued_job(user, subtopics: list[str], django_capture_on_commit_callbacks) -> Job:
    """A job created without sending it to the broker (the test runs it in-process)."""
    with django_capture_on_commit_callbacks(execute=False):
        return jobs.job_create(
            user_id=user.pk,
            key_id=None,
            topic=unique_topic(),
            subtopics=subtopics,
            model="gpt-test",
        )


@pytest.mark.usefixtures("openai_model")
def test_job_failing_item_is_recorded_others_done_and_all_failing_fails_the_job(
    user, upstream_settings, fake_upstream, django_capture_on_commit_callbacks
):
    from generation.tests.fake_upstream import Behaviour

    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.rule("Subtopic: Broken", Behaviour(kind="status", status=500))
    partial = queued_job(user, ["Fine", "Broken"], django_capture_on_commit_callbacks)

    assert jobs.job_run(job_id=partial.id) == "done"
    partial.refresh_from_db()
    assert partial.items[0]["error"] is None
    assert partial.items[1]["error"]["code"] == "upstream_error"
    assert jobs.job_result(job=partial)["items"][1]["explanation"] is None

    fake_upstream.default = Behaviour(kind="status", status=500)
    failing = queued_job(user, ["Broken one", "Broken two"], django_capture_on_commit_callbacks)
    assert jobs.job_run(job_id=failing.id) == "failed"
    failing.refresh_from_db()
    assert failing.error["code"] == "all_items_failed"
    assert failing.finished_at is not None


@pytest.mark.usefixtures("openai_model", "upstream_settings")
def test_job_yields_to_interactive_traffic_on_the_global_scope(
    user, owner_client, django_capture_on_commit_callbacks
):
    from quotas.models import GlobalLimits

    # Low priority may use half of the global hourly requests: 2 of 4.
    GlobalLimits.objects.update_or_create(pk=1, defaults={"requests_per_hour": 4})
    job = queued_job(user, ["One", "Two", "Three"], django_capture_on_commit_callbacks)

    with pytest.raises(jobs.JobQuotaWait) as wait:
        jobs.job_run(job_id=job.id)

    job.refresh_from_db()
    assert job.status == JobStatus.WAITING
    assert job.done_items == 2
    assert wait.value.scope == "global"
    assert wait.value.dimension == "requests_per_hour"
    # Interactive requests (priority high) still get through the same global scope.
    interactive = owner_client.post(
        "/api/v1/generate", {"prompt": "Hello", "model": "gpt-test"}, format="json"
    )
    assert interactive.status_code == 200, interactive.content


def test_job_purge_deletes_only_jobs_finished_before_the_retention(user):
    import datetime as dt

    now = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    request = {"topic": "t", "subtopics": ["a"], "model": "m"}
    old_done = Job.objects.create(
        user=user, request=request, status=JobStatus.DONE, finished_at=now - dt.timedelta(days=31)
    )
    recent = Job.objects.create(
        user=user, request=request, status=JobStatus.FAILED, finished_at=now - dt.timedelta(days=2)
    )
    old_waiting = Job.objects.create(
        user=user, request=request, status=JobStatus.WAITING, created_at=now - dt.timedelta(days=90)
    )

    assert jobs.job_purge(older_than_days=30, now=now) == 1
    assert set(Job.objects.values_list("pk", flat=True)) == {recent.pk, old_waiting.pk}
    assert not Job.objects.filter(pk=old_done.pk).exists()
    assert jobs.job_purge(older_than_days=0, now=now) == 0


@pytest.mark.usefixtures("openai_model", "upstream_settings")
def test_job_held_by_another_worker_is_not_run_twice(user, django_capture_on_commit_callbacks):
    from django.core.cache import cache

    job = queued_job(user, ["Only"], django_capture_on_commit_callbacks)
    # Held as a worker of the previous release held it (a rolling deploy): plain cache.add.
    cache.add(f"job-run:{job.id}", "another-worker", 1860)

    with pytest.raises(jobs.JobLocked):
        jobs.job_run(job_id=job.id)
    job.refresh_from_db()
    assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)

    cache.delete(f"job-run:{job.id}")
    assert jobs.job_run(job_id=job.id) == "done"


@pytest.mark.usefixtures("openai_model", "upstream_settings")
def test_job_whose_lock_redis_cannot_give_waits_instead_of_failing(
    user, settings, django_capture_on_commit_callbacks
):
    # With a RabbitMQ broker a job is delivered while Redis is away: it is put off, as a
    # held job is (the task retries it), not failed for good nor run unlocked.
    job = queued_job(user, ["Only"], django_capture_on_commit_callbacks)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    settings.CACHES = {
        "default": {
            **settings.CACHES["default"],
            "LOCATION": settings.REDIS_URL,
            "OPTIONS": {**settings.CACHES["default"]["OPTIONS"], "SOCKET_CONNECT_TIMEOUT": 0.2},
        }
    }

    with pytest.raises(jobs.JobLocked):
        jobs.job_run(job_id=job.id)

    job.refresh_from_db()
    assert (job.status, job.attempts, job.error) == (JobStatus.QUEUED, 0, None)


@pytest.mark.usefixtures("openai_model")
def test_job_create_with_broker_down_is_503_and_the_job_is_not_left_queued(user):
    import os
    import subprocess
    import sys

    from django.conf import settings

    db = settings.DATABASES["default"]
    script = (
        "import django; django.setup()\n"
        "from config.errors import ServiceUnavailable\n"
        "from generation import jobs\n"
        "try:\n"
        f"    jobs.job_create(user_id={user.pk}, key_id=None, topic='t', subtopics=['a'],"
        " model='gpt-test')\n"
        "except ServiceUnavailable as exc:\n"
        "    print(exc.status_code, exc.code)\n"
    )
    env = {
        **os.environ,
        # Nothing listens on port 1: the broker is down.
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=settings.BASE_DIR,
        check=False,
    )

    assert out.stdout.split() == ["503", "service_unavailable"], out.stderr[-2000:]
    job = Job.objects.get()
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "service_unavailable"


def test_job_retention_days_0_is_accepted_and_keeps_finished_jobs_for_ever(user, settings):
    import datetime as dt
    import os
    import subprocess
    import sys

    from generation.tasks import jobs_purge

    script = "import django; django.setup()\nfrom django.conf import settings\n"
    script += "print(settings.JOB_RETENTION_DAYS)\n"
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JOB_RETENTION_DAYS": "0"},
        cwd=settings.BASE_DIR,
        check=False,
    )
    assert out.stdout.strip() == "0", out.stderr[-2000:]

    settings.JOB_RETENTION_DAYS = 0
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=3650)
    Job.objects.create(user=user, request={"topic": "t"}, status=JobStatus.DONE, finished_at=old)
    assert jobs_purge() == 0
    assert Job.objects.count() == 1


@pytest.mark.usefixtures("openai_model", "upstream_settings")
def test_job_refused_for_quota_more_than_the_retries_fails_with_a_clear_state(
    user, settings, django_capture_on_commit_callbacks, monkeypatch
):
    from config.celery import app
    from generation.tasks import job_run

    # Retries of an eager task run again at once, in place, instead of raising Retry.
    monkeypatch.setitem(app.conf, "task_eager_propagates", False)
    settings.JOB_MAX_QUOTA_RETRIES = 3
    UserQuota.objects.create(user=user, requests_per_minute=1)
    job = queued_job(user, ["One", "Two"], django_capture_on_commit_callbacks)

    # Delivered for the sixth time (five runs put off while another worker held the job):
    # those retries are not quota refusals. Eager retries run again at once.
    assert job_run.apply(args=(str(job.id),), retries=5).get() == "failed"

    job.refresh_from_db()
    assert job.quota_retries == settings.JOB_MAX_QUOTA_RETRIES + 1
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "quota_exceeded"
    assert job.error["dimension"] == "requests_per_minute"
    assert job.error["scope"] == "user"
    assert job.retry_at is None
    assert job.finished_at is not None
    assert job.done_items == 1
    assert UsageRecord.objects.filter(request_id__startswith=f"job-{job.id.hex}").count() == 1


@pytest.mark.usefixtures("openai_model", "upstream_settings")
def test_job_failed_for_quota_shows_the_items_it_charged_and_those_not_run(
    user, owner_client, settings, django_capture_on_commit_callbacks
):
    from generation.tasks import job_run

    settings.JOB_MAX_QUOTA_RETRIES = 0
    UserQuota.objects.create(user=user, requests_per_minute=1)
    job = queued_job(user, ["One", "Two"], django_capture_on_commit_callbacks)
    assert job_run.apply(args=(str(job.id),)).get() == "failed"

    body = owner_client.get(f"/api/v1/jobs/{job.id}").json()

    assert body["status"] == "failed"
    assert body["error"]["code"] == "quota_exceeded"
    one, two = body["result"]["items"]
    assert one["subtopic"] == "One"
    assert one["explanation"]
    assert one["error"] is None
    assert two == {
        "subtopic": "Two",
        "explanation": None,
        "cached": False,
        "error": {"code": "not_run", "message": "The job stopped before this item was generated."},
    }
    row = UsageRecord.objects.get(request_id__startswith=f"job-{job.id.hex}")
    assert Decimal(body["result"]["cost_usd"]) == row.cost_usd > 0
    assert body["result"]["usage"]["total_tokens"] == row.prompt_tokens + row.completion_tokens


@pytest.mark.usefixtures("openai_model")
def test_job_whose_every_item_failed_shows_each_items_error(
    user, owner_client, upstream_settings, fake_upstream, django_capture_on_commit_callbacks
):
    from generation.tests.fake_upstream import Behaviour

    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)
    job = queued_job(user, ["A", "B"], django_capture_on_commit_callbacks)
    assert jobs.job_run(job_id=job.id) == "failed"

    body = owner_client.get(f"/api/v1/jobs/{job.id}").json()

    assert body["error"]["code"] == "all_items_failed"
    assert [i["error"]["code"] for i in body["result"]["items"]] == ["upstream_error"] * 2
    assert body["result"]["cost_usd"] == "0"
    assert not UsageRecord.objects.filter(
        request_id__startswith=f"job-{job.id.hex}", cost_usd__gt=0
    ).exists()


@pytest.mark.usefixtures("celery_worker", "openai_model", "upstream_settings")
def test_job_left_running_by_a_lost_message_is_sent_again_by_the_sweep(user, settings):
    import datetime as dt

    from generation.job_lock import JobLock
    from generation.tasks import jobs_sweep

    request = {"topic": unique_topic(), "subtopics": ["One"], "model": "gpt-test"}
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)

    def job(**fields) -> Job:
        made = Job.objects.create(user=user, request=request, total_items=1, items=[None], **fields)
        Job.objects.filter(pk=made.pk).update(updated_at=fields.get("updated_at", long_ago))
        return made

    # Its worker was killed and its message is gone: running, untouched for three hours.
    lost = job(status=JobStatus.RUNNING, attempts=1, started_at=long_ago)
    held = job(status=JobStatus.RUNNING)
    holder = JobLock(held.id)
    assert holder.acquire()
    recent = job(status=JobStatus.QUEUED, updated_at=dt.datetime.now(dt.UTC))
    finished = job(status=JobStatus.DONE, finished_at=long_ago)

    assert jobs_sweep() == 1

    done = wait_until(lambda: (j := job_status(lost.id)).status == JobStatus.DONE and j)
    assert done.attempts == 2
    assert done.items[0]["explanation"]
    assert jobs_sweep() == 0
    assert job_status(held.id).status == JobStatus.RUNNING
    assert job_status(recent.id).status == JobStatus.QUEUED
    assert job_status(finished.id).attempts == 0
    holder.release()


def run_in_thread(job_id: uuid.UUID) -> tuple[threading.Thread, dict[str, Any]]:
    """`jobs.job_run` in a thread of its own (a worker's run); `outcome` gets its "status"
    or its "error" once it ends."""
    from django.db import connection

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["status"] = jobs.job_run(job_id=job_id)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.usefixtures("openai_model")
def test_job_run_alive_past_its_lock_ttl_keeps_the_job_and_no_second_run_starts(
    user, upstream_settings, fake_upstream, django_capture_on_commit_callbacks
):
    from generation.job_lock import job_lock_held
    from generation.tests.fake_upstream import Behaviour

    upstream_settings.JOB_LOCK_SECONDS = 1
    upstream_settings.UPSTREAM_READ_TIMEOUT = 60.0
    first = Behaviour(kind="held")
    fake_upstream.script(first)
    job = queued_job(user, ["One", "Two"], django_capture_on_commit_callbacks)
    thread, outcome = run_in_thread(job.id)
    # The first item waits on its provider for three lives of the lock.
    wait_until(lambda: len(fake_upstream.requests) == 1)
    time.sleep(3 * upstream_settings.JOB_LOCK_SECONDS)

    assert job_lock_held(job_id=job.id)
    with pytest.raises(jobs.JobLocked):
        jobs.job_run(job_id=job.id)
    assert jobs.job_sweep(stale_after=3600, dead_after=1) == 0
    assert job_status(job.id).status == JobStatus.RUNNING
    first.gate.set()
    thread.join(timeout=60)

    assert outcome == {"status": "done"}
    job.refresh_from_db()
    assert (job.status, job.attempts) == (JobStatus.DONE, 1)
    assert len(fake_upstream.requests) == 2  # one call per item: nothing was paid twice
    assert UsageRecord.objects.filter(request_id__startswith=f"job-{job.id.hex}").count() == 2
    assert not job_lock_held(job_id=job.id)


@pytest.mark.usefixtures("celery_worker", "openai_model")
def test_job_whose_worker_was_killed_is_run_again_by_the_sweep_once_its_lock_expires(
    user, upstream_settings, fake_upstream, tmp_path
):
    import os
    import subprocess
    import sys

    from django.conf import settings

    from generation.job_lock import job_lock_held
    from generation.tasks import jobs_sweep
    from generation.tests.fake_upstream import Behaviour

    upstream_settings.JOB_LOCK_SECONDS = 1
    held = Behaviour(kind="held")
    fake_upstream.script(held)
    # Not sent to the broker: the worker process below is the one that takes it.
    job = Job.objects.create(
        user=user,
        request={"topic": unique_topic(), "subtopics": ["One", "Two"], "model": "gpt-test"},
        total_items=2,
        items=[None, None],
    )
    db = settings.DATABASES["default"]
    script = (
        "import django; django.setup()\n"
        "from django.conf import settings\n"
        "settings.JOB_LOCK_SECONDS = 1\n"
        f"settings.OPENAI_BASE_URL = {fake_upstream.openai_base_url!r}\n"
        "settings.OPENAI_API_KEY = 'sk-test'\n"
        "settings.UPSTREAM_READ_TIMEOUT = 60.0\n"
        # Its reservation of the item it dies in outlives it only briefly, so the next run
        # need not wait the usual minutes for the item.
        "settings.QUOTA_LEASE_TTL = 2\n"
        "from generation import jobs\n"
        f"jobs.job_run(job_id={str(job.id)!r})\n"
    )
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
    }
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(  # noqa: S603 - this interpreter, a fixed script
            [sys.executable, "-c", script], env=env, cwd=settings.BASE_DIR, stdout=out, stderr=out
        )

    def taken() -> bool:
        assert worker.poll() is None, log.read_text()[-2000:]
        return bool(fake_upstream.requests) and job_status(job.id).status == JobStatus.RUNNING

    try:
        # Its worker took the job and waits on the provider for the first item...
        wait_until(taken)
        assert job_lock_held(job_id=job.id)
    finally:
        worker.kill()  # ...and is killed outright: no `finally` of its own runs
        worker.wait()
    held.gate.set()  # the fake provider answers a worker that is no longer there

    # Nothing renews its lock now: it expires and the sweep sends the job again.
    wait_until(lambda: jobs_sweep() == 1, timeout=30)
    done = wait_until(lambda: (j := job_status(job.id)).status == JobStatus.DONE and j)

    assert done.attempts >= 2  # and more if it waited for the item it was killed in
    assert all(item["explanation"] and item["error"] is None for item in done.items)
    assert UsageRecord.objects.filter(request_id__startswith=f"job-{job.id.hex}").count() == 2
    assert not job_lock_held(job_id=job.id)


@pytest.mark.usefixtures("openai_model")
def test_job_run_that_lost_its_lock_to_another_run_stops_before_its_next_item(
    user, upstream_settings, fake_upstream, redis_conn, django_capture_on_commit_callbacks
):
    from generation.job_lock import JobLock, job_lock_key
    from generation.tests.fake_upstream import Behaviour

    upstream_settings.UPSTREAM_READ_TIMEOUT = 60.0
    first = Behaviour(kind="held")
    fake_upstream.script(first)
    job = queued_job(user, ["One", "Two"], django_capture_on_commit_callbacks)
    thread, outcome = run_in_thread(job.id)
    wait_until(lambda: len(fake_upstream.requests) == 1)
    # Redis forgot the lock (a failover) and another run took the job meanwhile.
    redis_conn.delete(job_lock_key(job.id))
    other = JobLock(job.id)
    assert other.acquire(renew=False)
    token = redis_conn.get(job_lock_key(job.id))

    first.gate.set()
    thread.join(timeout=60)

    assert isinstance(outcome.get("error"), jobs.JobLocked)
    assert len(fake_upstream.requests) == 1  # the second item was left to the other run
    job.refresh_from_db()
    assert job.done_items == 1
    assert redis_conn.get(job_lock_key(job.id)) == token
    other.release()


@pytest.mark.usefixtures("openai_model", "upstream_settings")
def test_job_item_an_earlier_run_left_in_flight_waits_and_the_other_items_go_on(
    user, settings, django_capture_on_commit_callbacks
):
    from generation.tasks import job_run
    from quotas.services import admission_admit, usage_refund

    job = queued_job(user, ["One", "Two"], django_capture_on_commit_callbacks)
    # A run that died calling the first item: its reservation holds the item's request id.
    left = admission_admit(
        user_id=user.pk,
        key_id=None,
        model="gpt-test",
        request_id=job.item_request_id(0),
        prompt_tokens=10,
        max_tokens=10,
        priority="low",
    )

    with pytest.raises(jobs.JobItemsInFlight):
        jobs.job_run(job_id=job.id)

    job.refresh_from_db()
    assert job.status == JobStatus.WAITING
    assert job.error["code"] == "duplicate_request"
    assert job.retry_at is not None
    assert job.items[0] is None  # not recorded as failed: it runs once its id is free
    assert job.items[1]["explanation"]
    assert job.quota_retries == 0
    usage_refund(admission=left, outcome="error")  # what the quota sweep does for a dead run

    assert job_run.apply(args=(str(job.id),)).get() == "done"
    job.refresh_from_db()
    assert (job.status, job.error) == (JobStatus.DONE, None)
    assert all(item["explanation"] and item["error"] is None for item in job.items)


def settle_item_then_die(job: Job, index: int, *, retry: int = 0) -> dict[str, Any]:
    """What a run that dies between an item's settlement and its record on the job row
    leaves behind: the item generated, charged, ledgered and cached under its request id
    (`retry`: the id derived for a later run), the job row running, the item still None."""
    Job.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, attempts=F("attempts") + 1)
    return jobs.explanation_item_generate(
        user_id=job.user_id,
        key_id=job.api_key_id,
        topic=job.request["topic"],
        subtopic=job.request["subtopics"][index],
        model=job.request["model"],
        request_id=job.item_request_id(index, retry=retry),
        priority=jobs.JOB_PRIORITY,
    )


def explanation_evict(job: Job, index: int) -> None:
    """The item's answer leaves the cache (evicted, invalidated) before the job runs again."""
    from caching.services import cache_delete
    from generation.services import explanation_cache_key

    subtopic = job.request["subtopics"][index]
    key = explanation_cache_key(
        topic=job.request["topic"], subtopic=subtopic, model=job.request["model"]
    )
    assert cache_delete(keys=[key]) == 1


def ledger_rows(job: Job) -> list[UsageRecord]:
    from quotas.services import usage_flush

    usage_flush()  # cache-hit rows are written in batches
    return list(
        UsageRecord.objects.filter(request_id__startswith=f"job-{job.id.hex}").order_by(
            "request_id"
        )
    )


def assert_counters_match_ledger(user, rows: list[UsageRecord]) -> None:
    """What Redis counted for the user today is what the ledger holds, request by request."""
    from quotas.policy import usd_to_micros
    from quotas.services import quota_standing

    limits = quota_standing(user_id=user.pk)["limits"]
    counted = [r for r in rows if r.outcome in ("ok", "cached")]
    assert limits["requests_per_day"]["used"] == len(counted)
    assert limits["tokens_per_day"]["used"] == sum(r.total_tokens for r in counted)
    assert usd_to_micros(Decimal(limits["cost_per_day"]["used"])) == sum(
        usd_to_micros(r.cost_usd) for r in counted
    )


def assert_result_is_what_the_ledger_charged(job: Job, rows: list[UsageRecord]) -> None:
    result = jobs.job_result(job=job)
    assert result is not None
    assert Decimal(result["cost_usd"]) == sum(r.cost_usd for r in rows) > 0
    assert result["usage"]["total_tokens"] == sum(r.total_tokens for r in rows)


@pytest.fixture
def day_budget(user):
    """Day limits on the user, so that its Redis counters can be read back."""
    return UserQuota.objects.create(
        user=user, requests_per_day=100, tokens_per_day=1_000_000, cost_per_day=Decimal(10)
    )


@pytest.mark.parametrize("deaths", [1, 2])
@pytest.mark.usefixtures("openai_model", "upstream_settings", "day_budget")
def test_job_item_settled_by_a_dead_run_and_gone_from_the_cache_is_charged_in_a_row_of_its_own(
    user, fake_upstream, deaths, django_capture_on_commit_callbacks
):
    job = queued_job(user, ["One", "Two"], django_capture_on_commit_callbacks)
    for retry in range(deaths):
        settle_item_then_die(job, 0, retry=retry)
        explanation_evict(job, 0)

    assert jobs.job_run(job_id=job.id) == "done"

    job.refresh_from_db()
    rows = ledger_rows(job)
    assert len(fake_upstream.requests) == deaths + 2
    # Every call the provider was paid for has a ledger row of its own.
    assert [r.request_id for r in rows] == sorted(
        [job.item_request_id(0, retry=n) for n in range(deaths + 1)] + [job.item_request_id(1)]
    )
    assert all(r.outcome == "ok" and r.cost_usd > 0 for r in rows)
    assert_counters_match_ledger(user, rows)
    assert all(item["explanation"] and item["error"] is None for item in job.items)
    assert job.items[0]["cached"] is False
    assert_result_is_what_the_ledger_charged(job, rows)


@pytest.mark.usefixtures("openai_model", "upstream_settings", "day_budget")
def test_job_item_settled_by_a_dead_run_and_still_cached_is_taken_from_the_cache_charged_once(
    user, fake_upstream, django_capture_on_commit_callbacks
):
    job = queued_job(user, ["One", "Two"], django_capture_on_commit_callbacks)
    settled = settle_item_then_die(job, 0)

    assert jobs.job_run(job_id=job.id) == "done"

    job.refresh_from_db()
    rows = ledger_rows(job)
    assert len(fake_upstream.requests) == 2  # the provider is not asked for the item again
    assert [r.request_id for r in rows] == [job.item_request_id(0), job.item_request_id(1)]
    assert_counters_match_ledger(user, rows)
    first = job.items[0]
    assert first["explanation"] == settled["explanation"]
    assert (first["cached"], first["cost_usd"]) == (False, settled["cost_usd"])
    assert first["usage"] == settled["usage"]
    assert_result_is_what_the_ledger_charged(job, rows)


@pytest.mark.usefixtures("openai_model", "upstream_settings", "day_budget")
def test_job_item_a_dead_run_was_calling_again_under_its_own_id_is_waited_for_then_charged_once(
    user, fake_upstream, django_capture_on_commit_callbacks
):
    from quotas.services import admission_admit, usage_refund

    job = queued_job(user, ["One"], django_capture_on_commit_callbacks)
    settle_item_then_die(job, 0)
    explanation_evict(job, 0)
    # The next run died calling the item again, under the id derived for that call.
    Job.objects.filter(pk=job.pk).update(attempts=F("attempts") + 1)
    left = admission_admit(
        user_id=user.pk,
        key_id=None,
        model="gpt-test",
        request_id=job.item_request_id(0, retry=1),
        prompt_tokens=10,
        max_tokens=10,
        priority=jobs.JOB_PRIORITY,
    )

    with pytest.raises(jobs.JobItemsInFlight):
        jobs.job_run(job_id=job.id)
    assert len(fake_upstream.requests) == 1
    usage_refund(admission=left, outcome="error")  # what the quota sweep does for a dead run

    assert jobs.job_run(job_id=job.id) == "done"
    job.refresh_from_db()
    rows = ledger_rows(job)
    assert len(fake_upstream.requests) == 2
    # The refunded call's row stays; the call made again is charged in one of its own.
    assert [(r.request_id, r.outcome) for r in rows] == [
        (job.item_request_id(0), "ok"),
        (job.item_request_id(0, retry=1), "error"),
        (job.item_request_id(0, retry=2), "ok"),
    ]
    assert_counters_match_ledger(user, rows)
    assert_result_is_what_the_ledger_charged(job, rows)


@pytest.mark.django_db  # in a transaction, so that the message is captured, not sent
@pytest.mark.usefixtures("openai_model")
def test_job_sweep_puts_a_dead_running_job_back_in_the_queue_and_sends_it_once(
    user, settings, django_capture_on_commit_callbacks
):
    import datetime as dt

    from generation.tasks import jobs_sweep

    settings.JOB_LOCK_SECONDS = 60
    now = dt.datetime.now(dt.UTC)
    dead = Job.objects.create(
        user=user,
        request={"topic": "t", "subtopics": ["One"], "model": "gpt-test"},
        total_items=1,
        items=[None],
        status=JobStatus.RUNNING,
        attempts=1,
    )
    Job.objects.filter(pk=dead.pk).update(updated_at=now - dt.timedelta(seconds=90))

    with django_capture_on_commit_callbacks(execute=False) as sent:
        assert jobs_sweep() == 1
        # Its message may wait in a long queue: later sweeps do not send it again (until it
        # is untouched for the stale period, a lost message).
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
        assert jobs.job_sweep(stale_after=3600, dead_after=60, now=later) == 0

    assert len(sent) == 1
    assert job_status(dead.id).status == JobStatus.QUEUED


@pytest.mark.usefixtures("openai_model")
def test_job_create_retried_with_the_same_idempotency_key_answers_the_first_job(owner_client):
    body = {"topic": unique_topic(), "subtopics": ["One", "Two"], "model": "gpt-test"}
    key = {"HTTP_IDEMPOTENCY_KEY": f"batch-{uuid.uuid4().hex}"}

    first = owner_client.post("/api/v1/jobs", body, format="json", **key)
    retry = owner_client.post("/api/v1/jobs", body, format="json", **key)
    other = owner_client.post(
        "/api/v1/jobs", {**body, "subtopics": ["Three"]}, format="json", **key
    )
    unkeyed = owner_client.post("/api/v1/jobs", body, format="json")

    assert first.status_code == retry.status_code == 202
    assert retry.json()["id"] == first.json()["id"]
    assert retry["Location"] == first["Location"]
    assert retry["Idempotent-Replayed"] == "true"
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    assert unkeyed.status_code == 202
    assert Job.objects.count() == 2


@pytest.mark.usefixtures("openai_model")
def test_job_created_with_a_generate_only_key_can_be_read_with_it(api_client, user):
    from rest_framework.test import APIClient

    generate_only, _ = key_create(user=user, name="batch", scopes=["generate"])
    usage_only, _ = key_create(user=user, name="reader", scopes=["usage"])
    models_only, _ = key_create(user=user, name="models", scopes=["model:gpt-test"])
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {generate_only}")
    created = api_client.post(
        "/api/v1/jobs",
        {"topic": unique_topic(), "subtopics": ["One"], "model": "gpt-test"},
        format="json",
    )
    assert created.status_code == 202

    for key in (generate_only, usage_only, models_only):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        read = client.get(created["Location"])
        assert read.status_code == 200, (key[:11], read.content)
        assert read.json()["id"] == created.json()["id"]
    reader = APIClient()
    reader.credentials(HTTP_AUTHORIZATION=f"Bearer {usage_only}")
    refused = reader.post(
        "/api/v1/jobs", {"topic": "t", "subtopics": ["a"], "model": "gpt-test"}, format="json"
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "permission_denied"

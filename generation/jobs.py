"""Asynchronous batch generation: create a job, run it, read it back.

A job is an explanations request (API.md `POST /api/v1/topics/explanations`) accepted at
once (202) and generated in the background by `generation.tasks.job_run`:

- every item is admitted at priority "low", so batch work gives way to interactive
  traffic on the shared global and provider scopes;
- every finished item is written to the job row before the next one starts, so a job
  delivered again resumes where it stopped, and each item carries a stable request id;
  an item that a dead run settled but did not record is taken from the cache, or if its
  answer is gone generated again under a request id of its own (`_item_resume`), so that
  no call to the provider is without its ledger row;
- an item refused for quota (`QuotaExceeded`) stops the run with `JobQuotaWait`; the task
  retries after the window's `retry_after` and the job shows status "waiting" meanwhile.
  Other per-item failures are recorded on the item, as in the synchronous endpoint.

A run holds the job's lock (`generation.job_lock`), short-lived and renewed while the run
is alive, so a job is never run twice at once, and one whose worker died is run again by
the sweep about `JOB_LOCK_SECONDS` plus a sweep period later.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from redis.exceptions import RedisError

from config.errors import ApiError, ServiceUnavailable
from generation.job_lock import JobLock, job_lock_held
from generation.models import FINISHED, UNFINISHED, Job, JobStatus
from quotas.errors import DuplicateRequest, QuotaExceeded
from quotas.models import Outcome, UsageRecord

logger = logging.getLogger("tollgate.jobs")

JOB_PRIORITY = "low"


class JobNotFound(ApiError):
    status_code = 404
    code = "not_found"
    message = "No such job."


class JobLocked(Exception):  # noqa: N818 - a state, not an error
    """Another worker is running this job (or one died holding the lock, or Redis cannot
    tell); try again later."""


class JobQuotaWait(Exception):  # noqa: N818 - a wait, not an error
    """An item was refused for quota; run the job again in `retry_after` seconds."""

    def __init__(self, retry_after: int, scope: str, dimension: str, waits: int = 0) -> None:
        super().__init__(f"quota wait of {retry_after}s ({scope}.{dimension})")
        self.retry_after = retry_after
        self.scope = scope
        self.dimension = dimension
        # How many times the job has now been refused for quota (its `quota_retries`).
        self.waits = waits


class JobItemsInFlight(Exception):  # noqa: N818 - a wait, not an error
    """Items that an earlier run started and never finished (its worker died mid-call) still
    hold their request ids in admission; run the job again in `retry_after` seconds."""

    def __init__(self, retry_after: int, items: int) -> None:
        super().__init__(f"{items} item(s) of an earlier run in flight; again in {retry_after}s")
        self.retry_after = retry_after
        self.items = items


def explanation_item_generate(
    *,
    user_id: int,
    key_id: int | None,
    topic: str,
    subtopic: str,
    model: str,
    request_id: str,
    priority: str,
) -> dict[str, Any]:
    """One explanation through the generation service's per-item path (cache, admission,
    upstream, settlement), as a job item. Raises QuotaExceeded when refused for quota and
    DuplicateRequest when the item's request id is in flight already; any other failure is
    returned as the item's `error`."""
    from generation.services import Caller, _explain_one, money

    caller = Caller(user_id=user_id, key_id=key_id, request_id=request_id, priority=priority)
    item = _explain_one(caller=caller, topic=topic, subtopic=subtopic, model=model)
    if item.error is not None:
        if isinstance(item.error, (QuotaExceeded, DuplicateRequest)):
            raise item.error
        return {"error": {"code": item.error.code, "message": item.error.message}}
    outcome = item.outcome
    assert outcome is not None  # noqa: S101 - an item has an outcome or an error
    return {
        "explanation": outcome.value.get("text", ""),
        "cached": outcome.cached,
        "usage": outcome.usage(),
        "cost_usd": money(outcome.cost),
    }


def job_create(
    *,
    user_id: int,
    key_id: int | None,
    topic: str,
    subtopics: list[str],
    model: str | None = None,
) -> Job:
    """Accept an explanations batch and queue it; the job runs once the transaction commits.

    Raises InvalidRequest (400) for an unknown or disabled model, 401/403 as admission would
    for a revoked key, an inactive or suspended user, or a model the plan does not allow.
    """
    from quotas.services import policy_get

    model = model or settings.TOLLGATE_DEFAULT_MODEL
    # Refuse now what admission would refuse for every item later.
    policy_get(user_id=user_id, key_id=key_id, model=model)
    job = Job.objects.create(
        user_id=user_id,
        api_key_id=key_id,
        kind=Job.KIND_EXPLANATIONS,
        request={"topic": topic, "subtopics": subtopics, "model": model},
        total_items=len(subtopics),
        items=[None] * len(subtopics),
    )
    job_enqueue(job_id=job.id)
    return job


def job_enqueue(*, job_id: uuid.UUID, countdown: float | None = None) -> None:
    """Send the job to the `jobs` queue once the current transaction commits.

    Raises ServiceUnavailable (503) when the broker cannot take it; the job is then marked
    failed, so that nothing waits for a message that was never sent.
    """
    from generation.tasks import job_run

    def send() -> None:
        try:
            job_run.apply_async((str(job_id),), countdown=countdown)
        except Exception as exc:
            logger.exception("job %s could not be queued", job_id)
            job_fail(
                job_id=job_id, code="service_unavailable", message="The job could not be queued."
            )
            raise ServiceUnavailable("The job queue is unavailable; try again shortly.") from exc

    transaction.on_commit(send)


def job_get(*, job_id: uuid.UUID | str, user_id: int | None, staff: bool) -> Job:
    """The job if the user owns it or `staff` (quotas.permissions.acts_as_staff) reads it;
    404 otherwise (ids of others' jobs stay hidden)."""
    try:
        job = Job.objects.get(pk=job_id)
    except (Job.DoesNotExist, ValueError, TypeError) as exc:
        raise JobNotFound() from exc
    if job.user_id != user_id and not staff:
        raise JobNotFound()
    return job


NOT_RUN = {"code": "not_run", "message": "The job stopped before this item was generated."}


def job_result(*, job: Job) -> dict[str, Any] | None:
    """The explanations response (API.md shape) of a finished job, done or failed, else None.

    A failed job's items finished before it stopped are there, as they were charged; the
    others have `explanation` null and the error `not_run`.
    """
    from generation.services import money

    if job.status not in FINISHED:
        return None
    prompt = completion = 0
    cost = Decimal(0)
    items = []
    for index, stored in enumerate(job.items):
        item = stored or {"subtopic": job.request["subtopics"][index], "error": NOT_RUN}
        usage = item.get("usage") or {}
        prompt += int(usage.get("prompt_tokens", 0))
        completion += int(usage.get("completion_tokens", 0))
        cost += Decimal(str(item.get("cost_usd", "0")))
        items.append(
            {
                "subtopic": item.get("subtopic"),
                "explanation": item.get("explanation"),
                "cached": bool(item.get("cached", False)),
                "error": item.get("error"),
            }
        )
    return {
        "items": items,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "cost_usd": money(cost),
    }


def _quota_wait_from(error: dict[str, Any] | None) -> JobQuotaWait | None:
    """An item answered with a quota error (rather than raising one) is a wait too."""
    if error and error.get("code") == QuotaExceeded.code:
        return JobQuotaWait(
            retry_after=max(1, int(error.get("retry_after") or 1)),
            scope=str(error.get("scope", "")),
            dimension=str(error.get("dimension", "")),
        )
    return None


def _item_resume(job: Job, index: int) -> tuple[str, list[UsageRecord]]:
    """(The request id to generate item `index` under, the settled ledger rows of the ids
    earlier runs of the job used for it, oldest first), for a job run before.

    A run that died between an item's settlement and its record left a settled row, which
    a second settlement under the same id would not replace: the item's next call gets the
    next id, `item_request_id(index, retry=n)`. A run tries an item at most once, so the
    job's `attempts` ids are all those ever used. An id without a settled row (none: refused
    or still in flight; pending or abandoned: nothing charged) is used again, so that a call
    of a dead run still in flight under it is waited for (DuplicateRequest)."""
    ids = [job.item_request_id(index, retry=n) for n in range(max(1, job.attempts))]
    rows = {
        row.request_id: row
        for row in UsageRecord.objects.filter(request_id__in=ids).exclude(
            outcome__in=(Outcome.PENDING, Outcome.ABANDONED)
        )
    }
    settled = [rows[i] for i in ids if i in rows]
    if not settled:
        return ids[0], []
    return job.item_request_id(index, retry=ids.index(settled[-1].request_id) + 1), settled


def _item_recover(job: Job, subtopic: str, settled: list[UsageRecord]) -> dict[str, Any] | None:
    """The item whose last call a dead run settled (answered, or counted as a hit), from
    the cache, with nothing charged again (its cost is in `settled`); None if that call
    failed or its answer is no longer in the cache."""
    from caching.services import cache_get
    from generation.services import explanation_cache_key

    last = settled[-1]
    if last.outcome not in (Outcome.OK, Outcome.CACHED):
        return None
    key = explanation_cache_key(
        topic=job.request["topic"], subtopic=subtopic, model=job.request["model"]
    )
    hit = cache_get(key)
    if hit is None:
        return None
    return {"explanation": hit.value.get("text", ""), "cached": last.cached}


def _item_record(
    job: Job,
    index: int,
    subtopic: str,
    outcome: dict[str, Any] | None,
    error: dict[str, Any] | None,
    *,
    charged: list[UsageRecord] | None = None,
) -> None:
    """Write the item on the job row. `charged`: ledger rows of its calls by earlier runs,
    whose usage and cost join the item's, so that the job shows what the ledger charged."""
    from generation.services import money

    outcome = outcome or {}
    usage = outcome.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    cost = Decimal(str(outcome.get("cost_usd", "0")))
    for row in charged or ():
        prompt += row.prompt_tokens
        completion += row.completion_tokens
        cost += row.cost_usd
    job.items[index] = {
        "subtopic": subtopic,
        "explanation": outcome.get("explanation"),
        "cached": bool(outcome.get("cached", False)),
        "error": error if error is not None else outcome.get("error"),
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "cost_usd": money(cost),
    }
    job.done_items = sum(1 for item in job.items if item is not None)
    job.save(update_fields=["items", "done_items", "updated_at"])


def job_run(*, job_id: uuid.UUID | str) -> str:
    """Generate the job's unfinished items in order; returns the job's status afterwards.

    Raises JobQuotaWait when an item is refused for quota (the finished items are kept),
    JobItemsInFlight when items of an earlier run are still in flight (the others are run
    first), and JobLocked when another worker holds the job, or took it over because this
    run's lock expired (checked before every item). A finished job is left alone.
    """
    lock = JobLock(job_id)
    try:
        acquired = lock.acquire()
    except RedisError as exc:
        # Whether another worker runs the job cannot be known: wait, as for a held job,
        # rather than fail it for good or risk two runs.
        logger.warning("job %s waits: its lock cannot be taken (Redis: %s)", job_id, exc)
        raise JobLocked(str(job_id)) from exc
    if not acquired:
        logger.info("job %s is being run by another worker", job_id)
        raise JobLocked(str(job_id))
    try:
        return _job_run_locked(job_id=job_id, lock=lock)
    finally:
        lock.release()


def _job_run_locked(*, job_id: uuid.UUID | str, lock: JobLock) -> str:
    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        logger.warning("job %s does not exist", job_id)
        return "missing"
    if job.status in FINISHED:
        return str(job.status)
    job.status = JobStatus.RUNNING
    job.attempts += 1
    job.retry_at = None
    job.error = None
    job.started_at = job.started_at or timezone.now()
    job.save(update_fields=["status", "attempts", "retry_at", "error", "started_at", "updated_at"])

    topic: str = job.request["topic"]
    model: str = job.request["model"]
    in_flight = 0
    for index, subtopic in enumerate(job.request["subtopics"]):
        if job.items[index] is not None:
            continue
        if not lock.renew():
            # Our lock expired and perhaps another run has the job: leave it to that run.
            raise JobLocked(str(job_id))
        request_id = job.item_request_id(index)
        charged: list[UsageRecord] = []
        if job.attempts > 1:
            # An earlier run may have settled the item and died before recording it.
            request_id, charged = _item_resume(job, index)
            recovered = _item_recover(job, subtopic, charged) if charged else None
            if recovered is not None:
                _item_record(job, index, subtopic, recovered, None, charged=charged)
                continue
        try:
            outcome = explanation_item_generate(
                user_id=job.user_id,
                key_id=job.api_key_id,
                topic=topic,
                subtopic=subtopic,
                model=model,
                request_id=request_id,
                priority=JOB_PRIORITY,
            )
        except QuotaExceeded as exc:
            raise _job_wait(job, JobQuotaWait(exc.retry_after, exc.scope, exc.dimension)) from exc
        except DuplicateRequest:
            # A run that died calling this item left its reservation, which holds the item's
            # request id until the quota sweep frees it: calling again now could pay twice.
            in_flight += 1
            continue
        except ApiError as exc:
            error = {"code": exc.code, "message": exc.message}
            _item_record(job, index, subtopic, None, error, charged=charged)
            continue
        wait = _quota_wait_from(outcome.get("error"))
        if wait is not None:
            raise _job_wait(job, wait)
        _item_record(job, index, subtopic, outcome, None, charged=charged)
    if in_flight:
        raise _job_wait_in_flight(job, in_flight)

    failed = all((item or {}).get("error") for item in job.items) and job.total_items > 0
    job.status = JobStatus.FAILED if failed else JobStatus.DONE
    if failed:
        job.error = {"code": "all_items_failed", "message": "Every item of the job failed."}
    job.finished_at = timezone.now()
    job.save(update_fields=["status", "error", "finished_at", "updated_at"])
    logger.info("job %s %s", job.id, job.status)
    return str(job.status)


def _job_wait(job: Job, wait: JobQuotaWait) -> JobQuotaWait:
    countdown = min(wait.retry_after, settings.JOB_RETRY_MAX_COUNTDOWN)
    job.status = JobStatus.WAITING
    job.quota_retries += 1
    job.retry_at = timezone.now() + dt.timedelta(seconds=countdown)
    job.error = {
        "code": QuotaExceeded.code,
        "message": "Waiting for the quota window to reset.",
        "scope": wait.scope,
        "dimension": wait.dimension,
        "retry_after": wait.retry_after,
    }
    job.save(update_fields=["status", "quota_retries", "retry_at", "error", "updated_at"])
    logger.info("job %s waits %ss for %s.%s", job.id, countdown, wait.scope, wait.dimension)
    return JobQuotaWait(countdown, wait.scope, wait.dimension, waits=job.quota_retries)


def _job_wait_in_flight(job: Job, items: int) -> JobItemsInFlight:
    countdown = settings.JOB_LOCK_SECONDS
    job.status = JobStatus.WAITING
    job.retry_at = timezone.now() + dt.timedelta(seconds=countdown)
    job.error = {
        "code": DuplicateRequest.code,
        "message": "Waiting for items of a stopped run to be released.",
        "items": items,
    }
    job.save(update_fields=["status", "retry_at", "error", "updated_at"])
    logger.info("job %s waits %ss for %s item(s) of an earlier run", job.id, countdown, items)
    return JobItemsInFlight(countdown, items)


def job_fail(*, job_id: uuid.UUID | str, code: str, message: str, **details: Any) -> None:
    """Mark a job failed (a task that gave up, or an unexpected error); `details` join
    `code` and `message` in its error. It will not run again, so it has no `retry_at`."""
    Job.objects.filter(pk=job_id).exclude(status__in=FINISHED).update(
        status=JobStatus.FAILED,
        error={"code": code, "message": message, **details},
        retry_at=None,
        finished_at=timezone.now(),
        updated_at=timezone.now(),
    )


def job_sweep(
    *, stale_after: float, dead_after: float | None = None, now: dt.datetime | None = None
) -> int:
    """Send again the unfinished jobs whose run or message is gone; returns how many were
    sent. No worker may hold such a job, and:

    - `running` and untouched for `dead_after` seconds (None: not looked for): its worker
      died (a live run renews its lock; a dead one's expires `JOB_LOCK_SECONDS` after its
      last renewal). It goes back to `queued` with the message sent now;
    - or untouched for `stale_after` seconds, whatever its status: its message was lost (a
      broker that forgot it).

    A job sent twice is safe: a finished job is left alone, a held one waits, and every
    finished item is kept and charged once. A job that a run takes while it is looked at is
    left to that run.
    """
    now = now or timezone.now()
    lost = Q(updated_at__lt=now - dt.timedelta(seconds=stale_after))
    if dead_after is not None:
        dead = now - dt.timedelta(seconds=dead_after)
        lost |= Q(status=JobStatus.RUNNING, updated_at__lt=dead)
    # A positive status list, so that the status index serves a sweep run every minute.
    stale = Job.objects.filter(lost, status__in=UNFINISHED).order_by()
    sent = 0
    for job_id, status, updated_at in stale.values_list("pk", "status", "updated_at")[:1000]:
        if job_lock_held(job_id=job_id):
            continue
        # Touched, so that the next sweep leaves it to the message sent now; unless a run
        # touched it first, since it was read.
        requeued = JobStatus.QUEUED if status == JobStatus.RUNNING else status
        if not Job.objects.filter(pk=job_id, updated_at=updated_at).update(
            status=requeued, updated_at=timezone.now()
        ):
            continue
        logger.warning("job %s was left unfinished and untouched; sending it again", job_id)
        job_enqueue(job_id=job_id)
        sent += 1
    return sent


def job_purge(*, older_than_days: int, now: dt.datetime | None = None) -> int:
    """Delete finished jobs that finished more than `older_than_days` ago; returns how many.
    Unfinished jobs are kept whatever their age. 0 keeps everything."""
    if older_than_days <= 0:
        return 0
    cutoff = (now or timezone.now()) - dt.timedelta(days=older_than_days)
    deleted, _ = Job.objects.filter(status__in=FINISHED, finished_at__lt=cutoff).delete()
    return deleted

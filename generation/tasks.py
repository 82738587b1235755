"""Background generation: the asynchronous batch jobs (queue `jobs`)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from generation import jobs

logger = logging.getLogger("tollgate.tasks")


class JobTask(Task):  # type: ignore[misc]
    """Records a job as failed when its task fails for good (HackSoft's on_failure)."""

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id:
            jobs.job_fail(job_id=job_id, code="internal_error", message="The job failed.")


@shared_task(
    bind=True,
    base=JobTask,
    name="generation.tasks.job_run",
    acks_late=True,
    max_retries=None,
    time_limit=1800,
    soft_time_limit=1500,
)
def job_run(self: Task, job_id: str) -> str:
    """Run an asynchronous batch job; a quota refusal retries it when the window resets."""
    try:
        return jobs.job_run(job_id=job_id)
    except jobs.JobQuotaWait as wait:
        # The job's own count of quota refusals: the task's retries also count the runs
        # put off because another worker held the job, or cut by the soft time limit.
        if wait.waits > settings.JOB_MAX_QUOTA_RETRIES:
            jobs.job_fail(
                job_id=job_id,
                code="quota_exceeded",
                message="The job was refused for quota too many times.",
                scope=wait.scope,
                dimension=wait.dimension,
            )
            return "failed"
        raise self.retry(countdown=wait.retry_after, max_retries=None) from wait
    except jobs.JobItemsInFlight as wait:
        # Not a quota refusal: it does not count against JOB_MAX_QUOTA_RETRIES.
        raise self.retry(countdown=wait.retry_after, max_retries=None) from wait
    except jobs.JobLocked as exc:
        # Delivered twice, or the previous holder died: look again once its lock would have
        # expired, were it dead (a live holder keeps renewing it, and this waits again).
        raise self.retry(countdown=settings.JOB_LOCK_SECONDS, max_retries=None) from exc
    except SoftTimeLimitExceeded as exc:
        # Finished items are kept; the rest continues in a fresh run.
        logger.warning("job %s hit the soft time limit; continuing in a new run", job_id)
        raise self.retry(countdown=1, max_retries=None) from exc


@shared_task(name="generation.tasks.jobs_purge", time_limit=600, soft_time_limit=540)
def jobs_purge() -> int:
    """Delete jobs finished more than JOB_RETENTION_DAYS ago; returns how many."""
    return jobs.job_purge(older_than_days=settings.JOB_RETENTION_DAYS)


@shared_task(name="generation.tasks.jobs_sweep", time_limit=600, soft_time_limit=540)
def jobs_sweep() -> int:
    """Send again the unfinished jobs whose worker died or whose message was lost; returns
    how many."""
    return jobs.job_sweep(
        stale_after=settings.JOB_STALE_SECONDS, dead_after=settings.JOB_LOCK_SECONDS
    )

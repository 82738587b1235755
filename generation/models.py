"""Asynchronous batch generation: one `Job` per accepted batch request.

A job's state lives here, in PostgreSQL, not in Celery's result backend: the worker that
runs it records every finished item as it goes, so a job delivered again (late
acknowledgement after a crash, a quota retry) resumes where it stopped and never pays for
a recorded item twice. An item a crashed run paid for but did not record is taken from the
cache; only if its answer is gone is it paid for again, in a ledger row of its own.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone


class JobStatus(models.TextChoices):
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    # Some items were refused for quota; the job runs again when the window resets.
    WAITING = "waiting", "waiting for quota"
    DONE = "done", "done"
    FAILED = "failed", "failed"


FINISHED = (JobStatus.DONE, JobStatus.FAILED)
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.WAITING)


class Job(models.Model):
    """A batch of explanations generated in the background at low priority."""

    KIND_EXPLANATIONS = "explanations"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="generation_jobs"
    )
    api_key = models.ForeignKey(
        "quotas.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    kind = models.CharField(max_length=32, default=KIND_EXPLANATIONS)
    request = models.JSONField(help_text="The validated request body.")
    status = models.CharField(
        max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True
    )
    total_items = models.PositiveIntegerField(default=0)
    done_items = models.PositiveIntegerField(default=0)
    # One entry per item, in request order: null until the item is finished, then
    # {"subtopic", "explanation", "cached", "error", "usage", "cost_usd"}.
    items = models.JSONField(default=list, blank=True)
    error = models.JSONField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    quota_retries = models.PositiveIntegerField(default=0)
    retry_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("-created_at",)
        indexes = [models.Index(fields=("user", "created_at"), name="job_user_created")]

    def __str__(self) -> str:
        return f"{self.kind} job {self.id} ({self.status})"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def item_request_id(self, index: int, *, retry: int = 0) -> str:
        """Stable request id of one item: a redelivered job settles each item once.

        `retry` n > 0: the id of the item's call n after the first, `<id>.<n>` (under 50
        characters for any job: the ledger allows 64). A run that died between an item's
        settlement and its record leaves a ledger row that a second settlement under the
        same id would not replace, so a call made again needs an id (and a row) of its own."""
        stable = f"job-{self.id.hex}-{index}"
        return f"{stable}.{retry}" if retry else stable

    def progress(self) -> dict[str, Any]:
        return {
            "done": self.done_items,
            "total": self.total_items,
            "percent": round(100 * self.done_items / self.total_items) if self.total_items else 0,
        }

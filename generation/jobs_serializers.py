"""Request and response bodies of the asynchronous jobs API."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from config.serializers import TextField
from generation.jobs import job_result
from generation.models import Job


class JobCreateInputSerializer(serializers.Serializer):
    """The explanations request of API.md: topic, 1..20 subtopics, optional model."""

    # TextField, as the synchronous endpoint's: a number sent for a text is a mistake the
    # client hears of, not an explanation of "42" generated and charged in the background.
    topic = TextField(max_length=200)
    subtopics = serializers.ListField(
        child=TextField(max_length=200), min_length=1, max_length=settings.JOB_MAX_SUBTOPICS
    )
    model = TextField(max_length=100, required=False)


class JobOutputSerializer(serializers.ModelSerializer):
    progress = serializers.SerializerMethodField()
    result = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = (
            "id",
            "url",
            "kind",
            "status",
            "progress",
            "result",
            "error",
            "attempts",
            "retry_at",
            "created_at",
            "started_at",
            "finished_at",
        )

    def get_progress(self, job: Job) -> dict[str, Any]:
        return job.progress()

    def get_result(self, job: Job) -> dict[str, Any] | None:
        return job_result(job=job)

    def get_url(self, job: Job) -> str:
        return f"/api/v1/jobs/{job.id}"

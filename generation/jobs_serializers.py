"""Request and response bodies of the asynchronous jobs API."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from generation.jobs import job_result
from generation.models import Job


class JobCreateInputSerializer(serializers.Serializer):
    """The explanations request of API.md: topic, 1..20 subtopics, optional model."""

    topic = serializers.CharField(max_length=200, trim_whitespace=True)
    subtopics = serializers.ListField(
        child=serializers.CharField(max_length=200, trim_whitespace=True),
        min_length=1,
        max_length=settings.JOB_MAX_SUBTOPICS,
    )
    model = serializers.CharField(max_length=100, required=False, allow_blank=False)


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

"""Asynchronous batch generation: POST /api/v1/jobs, GET /api/v1/jobs/<id>."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from generation import jobs, services
from generation.jobs_serializers import JobCreateInputSerializer, JobOutputSerializer
from generation.views import IDEMPOTENCY_HEADER, idempotent_response
from quotas.permissions import acts_as_staff
from quotas.views import RateLimitHeadersMixin, principal_of


class JobCreateView(RateLimitHeadersMixin, APIView):
    key_scope = "generate"

    @extend_schema(
        request=JobCreateInputSerializer,
        responses={202: JobOutputSerializer},
        parameters=[IDEMPOTENCY_HEADER],
        summary="Queue an explanations batch (generated in the background at low priority)",
    )
    def post(self, request: Request) -> Response:
        data = JobCreateInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        user_id, key_id = principal_of(request)

        def create() -> services.Replay:
            job = jobs.job_create(
                user_id=user_id,
                key_id=key_id,
                topic=data.validated_data["topic"],
                subtopics=data.validated_data["subtopics"],
                model=data.validated_data.get("model"),
            )
            body = JobOutputSerializer(job).data
            return services.Replay(status=202, body=body, headers={"Location": body["url"]})

        # A retry with the same Idempotency-Key answers the first job, not a second one.
        return idempotent_response(request, "jobs", create)


class JobDetailView(RateLimitHeadersMixin, APIView):
    # The key that created the job may follow its Location, as may one that reads usage.
    key_scope = ("generate", "usage")

    @extend_schema(
        responses={200: JobOutputSerializer},
        summary="A job's status, progress and, once finished, its result (owner or staff)",
    )
    def get(self, request: Request, job_id: uuid.UUID) -> Response:
        job = jobs.job_get(job_id=job_id, user_id=request.user.pk, staff=acts_as_staff(request))
        return Response(JobOutputSerializer(job).data)

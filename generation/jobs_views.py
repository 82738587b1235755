"""Asynchronous batch generation: POST /api/v1/jobs, GET /api/v1/jobs/<id>."""

from __future__ import annotations

import uuid

from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from generation import jobs
from generation.jobs_serializers import JobCreateInputSerializer, JobOutputSerializer


def _key_id(request: Request) -> int | None:
    auth = request.auth
    # An API-key request carries a KeyPrincipal; tokens and sessions carry no key id.
    return getattr(auth, "id", None) if hasattr(auth, "prefix") else None


class JobCreateView(APIView):
    def post(self, request: Request) -> Response:
        data = JobCreateInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = jobs.job_create(
            user_id=int(request.user.pk or 0),
            key_id=_key_id(request),
            topic=data.validated_data["topic"],
            subtopics=data.validated_data["subtopics"],
            model=data.validated_data.get("model"),
        )
        body = JobOutputSerializer(job).data
        return Response(body, status=202, headers={"Location": body["url"]})


class JobDetailView(APIView):
    def get(self, request: Request, job_id: uuid.UUID) -> Response:
        job = jobs.job_get(job_id=job_id, user=request.user)
        return Response(JobOutputSerializer(job).data)

"""Quota endpoints: the caller's standing, their usage, and (staff) the shared scopes."""

from __future__ import annotations

from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import APIException
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from caching.http import ConditionalGetMixin
from config.errors import InvalidRequest, PermissionDeniedError
from quotas import selectors, services
from quotas.permissions import IsStaff, KeyScopePermission, NotSuspended, acts_as_staff
from quotas.serializers import (
    QuotaGlobalOutputSerializer,
    QuotaStandingOutputSerializer,
    UsageQueryInputSerializer,
    UsageReportOutputSerializer,
)


def principal_of(request: Request) -> tuple[int, int | None]:
    """(user id, key id or None) of an authenticated request."""
    from quotas.authentication import KeyPrincipal

    auth = request.auth
    key_id = auth.id if isinstance(auth, KeyPrincipal) else None
    return int(request.user.pk or 0), key_id


def _standing_headers(request: Request) -> dict[str, str]:
    """The rate-limit headers of the request's caller, read and never counted; none for no
    caller, for bad, revoked or throttled credentials, or when the database cannot say (the
    response then goes out as it is)."""
    try:
        if not request.user.is_authenticated:
            return {}
        user_id, key_id = principal_of(request)
        return services.quota_headers(user_id=user_id, key_id=key_id)
    except (APIException, DatabaseError):
        return {}


def caller_headers(request: HttpRequest) -> dict[str, str]:
    """`_standing_headers` for the responses no API view makes (an unknown URL's 404, a
    body's 413): the request's credentials are checked here, and only for this."""
    authenticators = [auth() for auth in APIView.authentication_classes]
    return _standing_headers(Request(request, authenticators=authenticators))


class RateLimitHeadersMixin:
    """Puts the caller's rate-limit headers on every authenticated response that lacks them."""

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        if "RateLimit" not in response:
            for name, value in _standing_headers(request).items():
                response[name] = value
        return response


class QuotaStandingView(ConditionalGetMixin, RateLimitHeadersMixin, APIView):
    # Any key may read its own standing: a client checks it before it sends.
    permission_classes = (IsAuthenticated,)
    cache_max_age = 0  # live counters: revalidate every time (cheap with the ETag)

    @extend_schema(responses=QuotaStandingOutputSerializer, summary="The caller's own standing")
    def get(self, request: Request) -> Response:
        user_id, key_id = principal_of(request)
        return Response(services.quota_standing(user_id=user_id, key_id=key_id))


class UsageListView(ConditionalGetMixin, RateLimitHeadersMixin, APIView):
    permission_classes = (IsAuthenticated, KeyScopePermission, NotSuspended)
    key_scope = "usage"

    @extend_schema(
        parameters=[UsageQueryInputSerializer],
        responses=UsageReportOutputSerializer,
        summary="The caller's usage from the ledger",
    )
    def get(self, request: Request) -> Response:
        params = UsageQueryInputSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        user_id = int(request.user.pk or 0)
        if data.get("user"):
            if not acts_as_staff(request):
                raise PermissionDeniedError(
                    "Only staff may read another user's usage (with a key without endpoint scopes)."
                )
            other = selectors.user_id_by_username(data["user"])
            if other is None:
                raise InvalidRequest("Unknown user.", fields={"user": ["Unknown user."]})
            user_id = other
        return Response(
            selectors.usage_rows(
                user_id=user_id, start=data["start"], end=data["end"], group_by=data["group_by"]
            )
        )


class QuotaGlobalView(ConditionalGetMixin, RateLimitHeadersMixin, APIView):
    permission_classes = (IsStaff,)
    cache_max_age = 0

    @extend_schema(responses=QuotaGlobalOutputSerializer, summary="Global and provider scopes")
    def get(self, request: Request) -> Response:
        return Response(services.quota_global())

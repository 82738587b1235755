"""The project's URLs plus views that fail on purpose (for the error-path tests)."""

from django.http import HttpRequest, HttpResponse
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.urls import handler400, handler404, handler500
from config.urls import urlpatterns as project_urlpatterns


class BoomView(APIView):
    permission_classes = (AllowAny,)
    authentication_classes = ()

    def get(self, request: Request) -> Response:
        raise RuntimeError("internal detail that must not leak")

    def post(self, request: Request) -> Response:
        request.data  # noqa: B018 - read the body, as a real view would
        raise RuntimeError("internal detail that must not leak")


class BoomWithSecretsInLocalsView(BoomView):
    """Fails while its frame holds a credential and a prompt in local variables, as the
    authentication and generation code does while it serves a request."""

    def post(self, request: Request) -> Response:
        credential = request.META.get("HTTP_X_API_KEY", "")
        body = request.data
        raise RuntimeError(f"internal detail that must not leak ({len(credential)}, {len(body)})")


def plain_boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("internal detail that must not leak")


urlpatterns = [
    path("api/v1/test-boom", BoomView.as_view()),
    path("api/v1/test-boom-locals", BoomWithSecretsInLocalsView.as_view()),
    path("api/v1/test-boom-plain", plain_boom),
    path("v1/test-boom-plain", plain_boom),
    path("admin-boom", plain_boom),
    *project_urlpatterns,
]
__all__ = ["handler400", "handler404", "handler500", "urlpatterns"]

"""The views of the OpenAPI schema (/api/schema/) and of its Swagger UI page (/api/docs/).

In a module of their own: drf-spectacular's views import DRF's APIView, whose settings
import config.schema's schema class (a circular import from config.schema).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from quotas.views import RateLimitHeadersMixin


class JSONErrorsMixin(APIView):
    """An error of the view is the contract's JSON (`{"error": {...}}`, application/json),
    whatever renders its success. DRF would render it with the renderer negotiated for the
    page: YAML for the schema; for the docs a template renderer, which answers a bare status
    line, or a 500 when it reads the user of a request whose credentials it refused."""

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        if getattr(response, "exception", False):
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
        return response


class SchemaView(JSONErrorsMixin, RateLimitHeadersMixin, SpectacularAPIView):
    """The OpenAPI 3 document: YAML, or JSON when asked for (`Accept` or `?format=json`)."""


class SwaggerView(JSONErrorsMixin, RateLimitHeadersMixin, SpectacularSwaggerSplitView):
    """Swagger UI over the schema, within the app's Content-Security-Policy: its files are
    the app's own static files (drf-spectacular-sidecar), its start-up script is this URL
    with `?script` (drf-spectacular's split view) and its page has no inline style."""

    template_name = "docs/swagger_ui.html"

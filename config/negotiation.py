"""Content negotiation that answers the usual API client without parsing its Accept header."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

_PLAIN = frozenset(("", "*/*", "application/json"))


class JSONFirstNegotiation(DefaultContentNegotiation):
    """DRF's negotiation, except that a request accepting anything or JSON, with no format
    override, gets the first renderer (JSON) at once. Browsers (`Accept: text/html...`) and
    `?format=` still go through DRF's full negotiation."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: Any = None
    ) -> tuple[BaseRenderer, str]:
        renderers = list(renderers)
        first = renderers[0]
        if (
            request.META.get("HTTP_ACCEPT", "") in _PLAIN
            and format_suffix is None
            and first.media_type == "application/json"
            and not request.query_params.get(self.settings.URL_FORMAT_OVERRIDE or "")
        ):
            return first, first.media_type
        return super().select_renderer(request, renderers, format_suffix)  # type: ignore[no-any-return]

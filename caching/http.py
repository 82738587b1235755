"""HTTP caching for read-only GET endpoints: ETag, Cache-Control and 304 Not Modified.

Usage: put the mixin FIRST in the bases, so that it sees the headers the other mixins add:

    class QuotaDetailView(ConditionalGetMixin, RateLimitHeadersMixin, APIView): ...

Authenticated data is `private` (a browser may keep it, a shared cache may not) and varies
on the credentials; `s-maxage` for the CDN is only sent for public data and only when
CACHE_CDN_ENABLED. The ETag is a hash of the response data and its media type, computed
before rendering, so a 304 skips the renderer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.conf import settings
from django.utils.cache import patch_cache_control, patch_vary_headers
from django.utils.http import parse_etags
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response


def etag_for(data: Any, media_type: str = "") -> str:
    """A weak ETag of a response's data (same data, same representation: same tag)."""
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(f"{media_type}\x00{body}".encode()).hexdigest()[:32]
    return f'W/"{digest}"'


def _matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.removeprefix("W/") == wanted for tag in parse_etags(header))


def conditional_response(
    request: Request,
    response: Response,
    *,
    max_age: int | None = None,
    public: bool = False,
) -> Response:
    """Add ETag, Cache-Control (and Vary) to a 200 GET/HEAD response; answer 304 when the
    request's If-None-Match names the same ETag. Other responses pass through untouched.

    `max_age` defaults to CACHE_BROWSER_TTL; 0 means the client must revalidate each time
    (cheap with the ETag). `public=True` is only for data that is the same for everyone.
    """
    if request.method not in ("GET", "HEAD") or response.status_code != 200:
        return response
    renderer = getattr(response, "accepted_media_type", "") or ""
    etag = etag_for(response.data, renderer)
    response["ETag"] = etag
    age = settings.CACHE_BROWSER_TTL if max_age is None else max_age
    directives: dict[str, Any] = {"max_age": age}
    if public:
        directives["public"] = True
        if settings.CACHE_CDN_ENABLED:
            directives["s_maxage"] = settings.CACHE_CDN_TTL
    else:
        directives["private"] = True
        patch_vary_headers(response, ("Authorization", "X-API-Key", "Cookie"))
    if age == 0:
        directives["must_revalidate"] = True
    patch_cache_control(response, **directives)
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match and _matches(if_none_match, etag):
        # 304 Not Modified: same headers, no body (the JSON renderer renders None as b"").
        response.status_code = 304
        response.data = None
        response.accepted_renderer = JSONRenderer()
        response.accepted_media_type = "application/json"
    return response


class ConditionalGetMixin:
    """APIView mixin: ETag + Cache-Control on successful GETs, 304 on a matching
    If-None-Match. Class attributes: `cache_max_age` (None: CACHE_BROWSER_TTL) and
    `cache_public` (False: private, per-caller data)."""

    cache_max_age: int | None = None
    cache_public: bool = False

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        if not isinstance(response, Response):  # a plain HttpResponse: left alone
            return response
        return conditional_response(
            request, response, max_age=self.cache_max_age, public=self.cache_public
        )

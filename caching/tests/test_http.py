from __future__ import annotations

from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from caching.http import ConditionalGetMixin

factory = APIRequestFactory()


class PublicCatalogueView(ConditionalGetMixin, APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    cache_public = True

    def get(self, request):
        return Response({"models": ["local/demo"]})

    def post(self, request):
        return Response({"ok": True})


def _get(**headers):
    return PublicCatalogueView.as_view()(factory.get("/catalogue", **headers)).render()


def test_public_data_gets_browser_max_age_and_no_cdn_directive_by_default(settings):
    settings.CACHE_CDN_ENABLED = False
    settings.CACHE_BROWSER_TTL = 300

    response = _get()

    directives = {d.strip() for d in response["Cache-Control"].split(",")}
    assert directives == {"public", "max-age=300"}
    assert "Vary" not in response or "Authorization" not in response["Vary"]


def test_public_data_gets_s_maxage_when_cdn_enabled(settings):
    settings.CACHE_CDN_ENABLED = True
    settings.CACHE_CDN_TTL = 1800

    response = _get()

    assert "s-maxage=1800" in response["Cache-Control"]


def test_if_none_match_with_same_etag_is_304_and_other_etag_is_200():
    etag = _get()["ETag"]

    assert _get(HTTP_IF_NONE_MATCH=etag).status_code == 304
    assert _get(HTTP_IF_NONE_MATCH=f'"other", {etag}').status_code == 304
    assert _get(HTTP_IF_NONE_MATCH=etag.removeprefix("W/")).status_code == 304  # weak match
    assert _get(HTTP_IF_NONE_MATCH='"other"').status_code == 200


def test_post_is_left_alone():
    response = PublicCatalogueView.as_view()(factory.post("/catalogue", {}, format="json"))

    assert "ETag" not in response
    assert "Cache-Control" not in response

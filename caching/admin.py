"""An admin page to see the cache statistics and invalidate by pattern: /admin/cache/.

The cache tier has no model, so the page is added in front of the admin site's own URLs,
behind `admin_view` (active staff only, like the API endpoints). A Redis that cannot do
what is asked (unreachable, out of memory, read-only) is said in a message on the page,
as the API's cache endpoints answer 503 for it, never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path

from caching.patterns import PatternError, pattern_compile
from caching.services import cache_invalidate, cache_namespace_drop, cache_stats

# The API's own test of a Redis that cannot serve now (refused, hung, out of memory,
# read-only...): what its cache endpoints answer 503 for, this page says in a message.
from config.errors import _is_redis_unreachable as redis_unreachable

logger = logging.getLogger("tollgate.caching")


class InvalidateForm(forms.Form):
    pattern = forms.CharField(
        max_length=512,
        help_text="A glob over cache keys, case ignored: topic:python* , gen:* , "
        "topic:*:subtopics:* ; [abc] [a-z] [^abc] for one of a set or outside it, \\* for "
        "a star itself.",
    )

    def clean_pattern(self) -> str:
        pattern: str = self.cleaned_data["pattern"]
        try:
            pattern_compile(pattern)
        except PatternError as exc:
            raise forms.ValidationError(str(exc)) from exc
        return pattern


class NamespaceDropForm(forms.Form):
    namespace = forms.ChoiceField(
        choices=[("gen", "gen: generation answers"), ("topic", "topic: topic answers")],
        help_text="Drops every answer of the namespace at once (its entries expire on their own).",
    )


def _redis_unavailable(request: HttpRequest, exc: Exception, what: str) -> None:
    """Say on the page that Redis could not do `what`, rather than answer a 500."""
    logger.warning("cache admin page: %s failed: Redis is unavailable: %s", what, exc)
    messages.error(
        request,
        f"Redis is unavailable ({exc.__class__.__name__}: {exc}): {what} failed. "
        "Try again once it is back.",
    )


def cache_admin_view(request: HttpRequest) -> HttpResponse:
    posted = request.POST if request.method == "POST" else None
    form = InvalidateForm(posted if posted and "pattern" in posted else None)
    drop_form = NamespaceDropForm(posted if posted and "namespace" in posted else None)
    if form.is_valid():
        pattern = form.cleaned_data["pattern"]
        try:
            removed = cache_invalidate(pattern=pattern)
        except Exception as exc:
            if not redis_unreachable(exc):
                raise
            _redis_unavailable(request, exc, f"the invalidation of {pattern!r}")
        else:
            messages.success(request, f"Invalidated {removed} cached entries matching {pattern!r}.")
        return HttpResponseRedirect(request.path)
    if drop_form.is_valid():
        namespace = drop_form.cleaned_data["namespace"]
        try:
            cache_namespace_drop(namespace=namespace)
        except Exception as exc:
            if not redis_unreachable(exc):
                raise
            _redis_unavailable(request, exc, f"dropping the {namespace!r} namespace")
        else:
            messages.success(
                request, f"Dropped every cached answer of the {namespace!r} namespace."
            )
        return HttpResponseRedirect(request.path)
    stats: dict[str, Any] | None
    try:
        stats = cache_stats()
    except Exception as exc:
        if not redis_unreachable(exc):
            raise
        _redis_unavailable(request, exc, "reading the statistics")
        stats = None
    context = {
        **admin.site.each_context(request),
        "title": "Cache",
        "form": form,
        "drop_form": drop_form,
        "stats": stats,
    }
    return TemplateResponse(request, "caching/admin_cache.html", context)


def _with_cache_urls(
    get_urls: Callable[[], list[URLPattern | URLResolver]],
) -> Callable[[], list[URLPattern | URLResolver]]:
    def get_urls_with_cache() -> list[URLPattern | URLResolver]:
        own = [path("cache/", admin.site.admin_view(cache_admin_view), name="caching_cache")]
        return own + get_urls()

    return get_urls_with_cache


admin.site.get_urls = _with_cache_urls(admin.site.get_urls)  # type: ignore[method-assign]

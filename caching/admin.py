"""An admin page to see the cache statistics and invalidate by pattern: /admin/cache/.

The cache tier has no model, so the page is added in front of the admin site's own URLs,
behind `admin_view` (active staff only, like the API endpoints).
"""

from __future__ import annotations

from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path

from caching.services import cache_invalidate, cache_stats


class InvalidateForm(forms.Form):
    pattern = forms.CharField(
        max_length=512,
        help_text="A glob over cache keys: topic:python* , gen:* , topic:*:subtopics:*",
    )


def cache_admin_view(request: HttpRequest) -> HttpResponse:
    form = InvalidateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        pattern = form.cleaned_data["pattern"]
        removed = cache_invalidate(pattern=pattern)
        messages.success(request, f"Invalidated {removed} cached entries matching {pattern!r}.")
        return HttpResponseRedirect(request.path)
    context = {
        **admin.site.each_context(request),
        "title": "Cache",
        "form": form,
        "stats": cache_stats(),
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

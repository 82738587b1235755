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

from caching.patterns import PatternError, pattern_compile
from caching.services import cache_invalidate, cache_namespace_drop, cache_stats


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


def cache_admin_view(request: HttpRequest) -> HttpResponse:
    posted = request.POST if request.method == "POST" else None
    form = InvalidateForm(posted if posted and "pattern" in posted else None)
    drop_form = NamespaceDropForm(posted if posted and "namespace" in posted else None)
    if form.is_valid():
        pattern = form.cleaned_data["pattern"]
        removed = cache_invalidate(pattern=pattern)
        messages.success(request, f"Invalidated {removed} cached entries matching {pattern!r}.")
        return HttpResponseRedirect(request.path)
    if drop_form.is_valid():
        namespace = drop_form.cleaned_data["namespace"]
        cache_namespace_drop(namespace=namespace)
        messages.success(request, f"Dropped every cached answer of the {namespace!r} namespace.")
        return HttpResponseRedirect(request.path)
    context = {
        **admin.site.each_context(request),
        "title": "Cache",
        "form": form,
        "drop_form": drop_form,
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

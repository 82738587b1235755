"""The operator's dashboard: an admin page (staff only) that shows today's traffic, spend
and cache hit rate, the top spenders against their budgets, refusals by reason, the last
30 days as server-rendered SVG charts, and the circuit breakers that are open."""

from __future__ import annotations

from decimal import Decimal

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache

from health import charts, selectors


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:,.4f}"


@never_cache
def dashboard(request: HttpRequest) -> HttpResponse:
    """Mounted behind `admin.site.admin_view` (staff login) in config/urls.py."""
    overview = selectors.dashboard_overview(now=timezone.now())
    days = [d.day for d in overview.series]
    requests_chart = charts.bar_chart(
        title="Requests per day",
        days=days,
        values=[d.requests for d in overview.series],
        secondary=[d.cached for d in overview.series],
        legend="from cache",
    )
    cost_chart = charts.bar_chart(
        title="Cost per day (USD)",
        days=days,
        values=[d.cost_usd for d in overview.series],
        fmt=_usd,
    )
    tokens_chart = charts.bar_chart(
        title="Tokens per day",
        days=days,
        values=[d.tokens for d in overview.series],
    )
    context = {
        **admin.site.each_context(request),
        "title": "Operations dashboard",
        "overview": overview,
        "today": overview.today,
        "hit_rate_percent": (
            None if overview.today.hit_rate is None else round(overview.today.hit_rate * 100, 1)
        ),
        "charts": [requests_chart, tokens_chart, cost_chart],
        "top_users": [
            {
                "spend": spend,
                "day_percent": _percent(spend.day_use),
                "month_percent": _percent(spend.month_use),
                "day_bar": _bar(spend.day_use),
                "month_bar": _bar(spend.month_use),
            }
            for spend in overview.top_users
        ],
        "denials_total": sum(n for _, _, n in overview.denials),
        "zero": Decimal(0),
    }
    return TemplateResponse(request, "dashboard/index.html", context)


def _percent(value: float | None) -> float | None:
    return None if value is None else round(value * 100, 1)


def _bar(value: float | None) -> float:
    """Width of a 100-unit gauge, clamped (an overspent budget fills it)."""
    return 0.0 if value is None else round(min(1.0, max(0.0, value)) * 100, 1)

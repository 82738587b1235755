"""The operators' console: plans, per-user quotas (on the user), API keys, the model
catalogue, provider and global limits, and the read-only ledger, refusals and audit trail.

Every view that can write runs inside `acting_as(request.user)`, so the audit trail written
by quotas.signals names the operator. Changes go through model saves (never
`QuerySet.update`), which is what bumps the policy version and reaches every worker.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.functional import cached_property
from django.utils.safestring import SafeString, mark_safe
from django.utils.text import smart_split, unescape_string_literal

from quotas import forms
from quotas.audit import acting_as
from quotas.models import (
    DIMENSIONS,
    ApiKey,
    AuditEntry,
    DenialCount,
    GlobalLimits,
    ModelPrice,
    Plan,
    Provider,
    ProviderQuota,
    UsageRecord,
    UserQuota,
)
from quotas.policy import usd_text
from quotas.selectors import model_references

logger = logging.getLogger("tollgate.admin")
User = get_user_model()

EXTEND_DAYS = 30
LIMIT_FIELDSETS: tuple[Any, ...] = (
    ("Requests", {"fields": ("requests_per_minute", "requests_per_hour", "requests_per_day")}),
    ("Tokens", {"fields": ("tokens_per_minute", "tokens_per_day")}),
    ("Cost (USD)", {"fields": ("cost_per_day", "cost_per_month")}),
    ("Concurrency", {"fields": ("concurrency",)}),
)
# The attribute of the request that carries a just-created key to the next page, and only
# there: the full key is never stored, not even in the session.
_NEW_KEY_ATTR = "_tollgate_new_api_key"


class AuditedAdmin(admin.ModelAdmin):
    """Runs every writing view (forms, inlines, actions, list edits, deletes) as its user."""

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        with acting_as(request.user):
            return super().changeform_view(request, object_id, form_url, extra_context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        with acting_as(request.user):
            return super().changelist_view(request, extra_context)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        with acting_as(request.user):
            return super().delete_view(request, object_id, extra_context)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable, never written from the admin (the ledger, refusals, the audit trail)."""

    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _reset_windows(admin_: admin.ModelAdmin, request: HttpRequest, users: list[Any]) -> None:
    from quotas.services import quota_reset_windows

    reset, failed = [], []
    for user in users:
        try:
            quota_reset_windows(user_id=user.pk)
        except Exception as exc:
            logger.exception("resetting the windows of user %s failed", user.pk)
            failed.append(f"{user} ({exc.__class__.__name__}: {exc})")
        else:
            admin_.log_change(request, user, "Reset the current quota windows.")
            reset.append(str(user))
    if reset:
        admin_.message_user(request, f"Current windows reset for: {', '.join(reset)}.")
    if failed:
        admin_.message_user(
            request, f"Could not reset the windows of: {'; '.join(failed)}.", messages.ERROR
        )


def duration(seconds: float) -> str:
    """A wait for a person: "45 s", "12 min 5 s", "13 h 4 min", "2 d 3 h"."""
    total = max(0, math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def live_usage_html(user_id: int, key_id: int | None = None) -> SafeString:
    """The standing of a user (or of one of their keys) against each limit, with links to
    the user's ledger rows; or why it is unavailable (the page renders either way)."""
    try:
        from quotas.services import quota_standing

        standing: dict[str, Any] | None = quota_standing(user_id=user_id, key_id=key_id)
        error = None
    except Exception as exc:
        logger.exception("live usage of user %s is unavailable", user_id)
        standing, error = None, f"{exc.__class__.__name__}: {exc}"
    rows = []
    if standing is not None:
        for dimension, values in (standing.get("limits") or {}).items():
            limited = values.get("limit") is not None
            reset_in = values.get("reset_in")
            rows.append(
                {
                    **values,
                    "dimension": dimension.replace("_", " "),
                    "resets": duration(reset_in) if limited and reset_in is not None else "-",
                }
            )
    ledger = reverse("admin:quotas_usagerecord_changelist")
    filters = f"user__id__exact={user_id}" + (f"&api_key__id__exact={key_id}" if key_id else "")
    context = {
        "standing": standing,
        "rows": rows,
        "error": error,
        "ledger_url": f"{ledger}?{filters}",
    }
    html = render_to_string("admin/quotas/live_usage.html", context)
    return mark_safe(html)  # noqa: S308  (rendered by an autoescaping template)


# --- Plans and per-user quotas ---


@admin.register(Plan)
class PlanAdmin(AuditedAdmin):
    form = forms.PlanForm
    list_display = ("name", *DIMENSIONS, "allow_stale_fallback", "user_count")
    search_fields = ("name",)
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "description")}),
        *LIMIT_FIELDSETS,
        ("Models", {"fields": ("allowed_models", "allow_stale_fallback")}),
        ("History", {"fields": ("created_at", "updated_at")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Plan]:
        return super().get_queryset(request).annotate(users=Count("userquota"))

    @admin.display(description="users", ordering="users")
    def user_count(self, obj: Any) -> int:
        return int(getattr(obj, "users", 0))

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        """The default plan is refused as a protected object would be, on its delete page
        and by "Delete selected": deleted, it would leave every user without a quota row of
        their own without plan limits."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        protected += [
            f"QUOTA_DEFAULT_PLAN: “{plan.name}” is the plan of every user without a quota "
            "of their own (set QUOTA_DEFAULT_PLAN to another plan first)"
            for plan in objs
            if plan.name == settings.QUOTA_DEFAULT_PLAN
        ]
        return deleted, counts, perms_needed, protected


class UserQuotaInline(admin.StackedInline):
    model = UserQuota
    form = forms.GovernanceForm
    can_delete = True
    max_num = 1
    extra = 0
    fk_name = "user"
    verbose_name_plural = "quota (plan and overrides; empty limits inherit the plan's)"
    fieldsets = (
        (None, {"fields": ("plan", "suspended")}),
        *LIMIT_FIELDSETS,
    )


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fk_name = "user"
    fields = ("display", "name", "scopes", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "API keys"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.action(description="Reset current quota windows", permissions=["change"])
def reset_user_windows(
    admin_: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    _reset_windows(admin_, request, list(queryset))


admin.site.unregister(User)


@admin.register(User)
class UserAdmin(AuditedAdmin, DjangoUserAdmin):  # type: ignore[type-arg]
    inlines = (UserQuotaInline, ApiKeyInline)
    list_display = ("username", "email", "is_staff", "is_active", "plan", "suspended")
    readonly_fields = ("last_login", "date_joined", "live_usage")
    actions = (reset_user_windows,)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets
        return (("Live usage", {"fields": ("live_usage",)}), *fieldsets)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).select_related("quota__plan")

    @admin.display(description="plan", ordering="quota__plan__name")
    def plan(self, obj: Any) -> str:
        quota = getattr(obj, "quota", None)
        return str(quota.plan) if quota is not None and quota.plan else "(default)"

    @admin.display(description="suspended", boolean=True)
    def suspended(self, obj: Any) -> bool:
        quota = getattr(obj, "quota", None)
        return bool(quota is not None and quota.suspended)

    @admin.display(description="standing against each limit")
    def live_usage(self, obj: Any) -> SafeString:
        return live_usage_html(obj.pk)


@admin.register(UserQuota)
class UserQuotaAdmin(AuditedAdmin):
    form = forms.GovernanceForm
    list_display = ("user", "plan", "suspended", *DIMENSIONS, "updated_at")
    list_filter = ("plan", "suspended")
    list_select_related = ("user", "plan")
    search_fields = ("user__username", "user__email")
    autocomplete_fields = ("user",)
    readonly_fields = ("live_usage", "updated_at")
    fieldsets = (
        (None, {"fields": ("user", "plan", "suspended")}),
        ("Live usage", {"fields": ("live_usage",)}),
        *LIMIT_FIELDSETS,
        ("History", {"fields": ("updated_at",)}),
    )
    actions = ("reset_windows", "suspend", "unsuspend")

    @admin.display(description="standing against each limit")
    def live_usage(self, obj: UserQuota) -> SafeString | str:
        return live_usage_html(obj.user_id) if obj.pk else "-"

    @admin.action(description="Reset current quota windows", permissions=["change"])
    def reset_windows(self, request: HttpRequest, queryset: QuerySet[UserQuota]) -> None:
        _reset_windows(self, request, [quota.user for quota in queryset.select_related("user")])

    def _set_suspended(self, queryset: QuerySet[UserQuota], value: bool) -> int:
        changed = 0
        for quota in queryset.filter(suspended=not value):
            quota.suspended = value
            quota.save(update_fields=["suspended", "updated_at"])
            changed += 1
        return changed

    @admin.action(description="Suspend the selected users", permissions=["change"])
    def suspend(self, request: HttpRequest, queryset: QuerySet[UserQuota]) -> None:
        count = self._set_suspended(queryset, True)
        self.message_user(request, f"{count} user(s) suspended.")

    @admin.action(description="Lift the suspension of the selected users", permissions=["change"])
    def unsuspend(self, request: HttpRequest, queryset: QuerySet[UserQuota]) -> None:
        count = self._set_suspended(queryset, False)
        self.message_user(request, f"{count} suspension(s) lifted.")


# --- API keys ---


class KeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "active"), ("expired", "expired"), ("revoked", "revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        live = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        if self.value() == "active":
            return queryset.filter(live, revoked_at__isnull=True)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True).exclude(live)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(AuditedAdmin):
    form = forms.ApiKeyForm
    list_display = (
        "display",
        "name",
        "user",
        "status",
        "scope_list",
        "expires_at",
        "last_used_at",
        "created_at",
    )
    list_filter = (KeyStatusFilter, "created_at")
    list_select_related = ("user",)
    search_fields = ("=prefix", "name", "user__username")
    autocomplete_fields = ("user",)
    date_hierarchy = "created_at"
    actions = ("revoke", "extend_expiry")
    change_readonly = (
        "user",
        "display",
        "prefix",
        "secret_hash",
        "revoked_at",
        "last_used_at",
        "created_at",
        "live_usage",
    )

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = forms.ApiKeyCreateForm
        return super().get_form(request, obj, change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return () if obj is None else self.change_readonly

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return (
                (
                    None,
                    {
                        "fields": ("user", "name", "scopes", "expires_at"),
                        "description": "The key is generated on save and shown once, on the "
                        "next page. Only its prefix and a hash of its secret are kept.",
                    },
                ),
                *LIMIT_FIELDSETS,
            )
        return (
            (None, {"fields": ("display", "user", "name", "scopes", "expires_at")}),
            (
                "Live usage (the tightest of this key's and its owner's limits)",
                {"fields": ("live_usage",)},
            ),
            ("State", {"fields": ("revoked_at", "last_used_at", "created_at")}),
            ("Stored credential", {"fields": ("prefix", "secret_hash")}),
            *LIMIT_FIELDSETS,
        )

    @admin.display(description="key", ordering="prefix")
    def display(self, obj: ApiKey) -> str:
        return obj.display

    @admin.display(description="scopes")
    def scope_list(self, obj: ApiKey) -> str:
        return ", ".join(obj.scopes or ()) or "(all)"

    @admin.display(description="standing against each limit")
    def live_usage(self, obj: ApiKey) -> SafeString:
        return live_usage_html(obj.user_id, key_id=obj.pk)

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        if obj.revoked_at is not None:
            return "revoked"
        return "expired" if obj.is_expired() else "active"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        from quotas.services import key_create

        data = form.cleaned_data
        full_key, created = key_create(
            user=data["user"],
            name=data.get("name") or "",
            scopes=data.get("scopes") or [],
            expires_at=data.get("expires_at"),
            **form.limits(),
        )
        # The admin goes on with `obj` (history entry, redirect): make it the saved key.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(created, field.attname))
        obj._state.adding = False
        obj._state.db = created._state.db
        setattr(request, _NEW_KEY_ATTR, full_key)

    def response_add(
        self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        full_key = getattr(request, _NEW_KEY_ATTR, None)
        if full_key is None:
            return super().response_add(request, obj, post_url_continue)
        delattr(request, _NEW_KEY_ATTR)
        info = (self.opts.app_label, self.opts.model_name)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "API key created",
            "key": obj,
            "full_key": full_key,
            "change_url": reverse("admin:{}_{}_change".format(*info), args=(obj.pk,)),
            "add_url": reverse("admin:{}_{}_add".format(*info)),
            "changelist_url": reverse("admin:{}_{}_changelist".format(*info)),
        }
        response = TemplateResponse(request, "admin/quotas/apikey/key_created.html", context)
        # The page carries a secret: no cache of any kind may keep it.
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke the selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        from quotas.services import key_revoke

        revoked = 0
        for key in queryset.filter(revoked_at__isnull=True):
            key_revoke(key=key)
            revoked += 1
        self.message_user(request, f"{revoked} key(s) revoked; they are refused from now on.")

    @admin.action(
        description="Extend the expiry of the selected keys by 30 days", permissions=["change"]
    )
    def extend_expiry(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        from quotas.services import key_extend

        extended, skipped = 0, 0
        for key in queryset:
            # A key without an expiry already lives for ever: giving it one would shorten it.
            # An expired key gets 30 days from now (key_extend), not from a date already past.
            if key.expires_at is None or key.revoked_at is not None:
                skipped += 1
                continue
            key_extend(key=key, days=EXTEND_DAYS)
            extended += 1
        self.message_user(request, f"{extended} key(s) extended by 30 days.")
        if skipped:
            self.message_user(
                request,
                f"{skipped} key(s) left as they were (revoked, or without an expiry).",
                messages.WARNING,
            )


# --- Catalogue, provider and global limits ---


@admin.register(ModelPrice)
class ModelPriceAdmin(AuditedAdmin):
    form = forms.ModelPriceForm
    list_display = (
        "model",
        "provider",
        "upstream_model",
        "input_per_million",
        "output_per_million",
        "context_window",
        "max_output_tokens",
        "enabled",
    )
    list_filter = ("provider", "enabled")
    search_fields = ("model", "upstream_model")

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[Any]]:
        """A model that a provider quota, a plan, a key or the default model still names is
        refused as a protected object would be, on its delete page and by "Delete
        selected": both list what names it and offer no confirmation (the templates of
        admin/quotas/modelprice/ say why). Disabling it keeps what names it valid."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        for obj in objs:
            references = model_references(model=obj.model, provider=obj.provider)
            protected += [f"{obj.model}: {reference}" for reference in references]
        return deleted, counts, perms_needed, protected


@admin.register(ProviderQuota)
class ProviderQuotaAdmin(AuditedAdmin):
    form = forms.ProviderQuotaForm
    list_display = (
        "provider",
        "model_or_all",
        "requests_per_minute",
        "requests_per_day",
        "tokens_per_minute",
        "tokens_per_day",
        "safety_margin",
    )
    list_filter = ("provider",)
    search_fields = ("model",)

    @admin.display(description="model", ordering="model")
    def model_or_all(self, obj: ProviderQuota) -> str:
        return obj.model or "(all models)"


@admin.register(GlobalLimits)
class GlobalLimitsAdmin(AuditedAdmin):
    """One row; the engine reads the row with primary key 1."""

    form = forms.GlobalLimitsForm
    list_display = (
        "__str__",
        "cost_per_day",
        "requests_per_hour",
        "concurrency",
        "low_share",
        "medium_share",
        "high_share",
        "updated_at",
    )
    readonly_fields = ("updated_at",)
    fieldsets = (
        ("All users together", {"fields": ("cost_per_day", "requests_per_hour", "concurrency")}),
        (
            "Priority shares of the global and provider scopes",
            {
                "fields": ("high_share", "medium_share", "low_share"),
                "description": "The fraction of a shared scope each priority may fill "
                "(critical may use all of it), rounded down but never to nothing: a share "
                "above 0 of a limit of 1 is that 1.",
            },
        ),
        ("History", {"fields": ("updated_at",)}),
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return super().has_add_permission(request) and not GlobalLimits.objects.exists()

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: GlobalLimits, form: Any, change: bool) -> None:
        if not change:
            obj.pk = 1
        super().save_model(request, obj, form, change)


# --- Read-only records ---


def _period_start(moment: dt.datetime, kind: str) -> dt.datetime:
    moment = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "day":
        return moment
    return moment.replace(day=1, month=1 if kind == "year" else moment.month)


def _period_next(start: dt.datetime, kind: str) -> dt.datetime:
    if kind == "day":
        return start + dt.timedelta(days=1)
    if kind == "year" or start.month == 12:
        return start.replace(year=start.year + 1, month=1 if kind == "month" else start.month)
    return start.replace(month=start.month + 1)


class LedgerQuerySet(QuerySet[UsageRecord]):
    """The ledger as the admin lists it: `datetimes()` (the date hierarchy's years, months
    or days) without a DISTINCT over every row of the table. It walks the index instead:
    the first row, then the first row past that row's period, and so on, one LIMIT 1 look-up
    per period that has rows (at most 12 months or 31 days), so the cost follows the span of
    dates, not the size of the ledger."""

    def datetimes(  # type: ignore[override]
        self, field_name: str, kind: str, order: str = "ASC", tzinfo: Any = None
    ) -> list[dt.datetime]:
        zone = tzinfo or timezone.get_current_timezone()
        moments = self.order_by(field_name).values_list(field_name, flat=True)
        periods = []
        found = moments.first()
        while found is not None:
            start = _period_start(timezone.localtime(found, zone), kind)
            periods.append(start)
            found = moments.filter(**{f"{field_name}__gte": _period_next(start, kind)}).first()
        return periods if order == "ASC" else periods[::-1]


# The ledger's list counts and pages its latest rows up to this many (100 pages).
LEDGER_LIST_MAX_ROWS = 10_000


class LedgerPaginator(Paginator):
    """The ledger's pages: its latest `LEDGER_LIST_MAX_ROWS` rows (of those the dates,
    filters and search select), and no further.

    Django's paginator counts every row (a scan of the whole ledger at each visit: 0.1-0.2
    s at two million rows) and links the last page, whose OFFSET walks every row of the
    ledger with its joins (past DATABASE_READ_TIMEOUT_MS at two million rows: a 503, and
    the worker holding the database as if it hung). This one counts at most one row past
    the cap, and has no page beyond it; the
    list says it holds more (`capped`). Older rows are reached through the date hierarchy,
    the filters or the search, as anyone looking for a row does (docs/BENCHMARKS.md)."""

    capped = False

    @cached_property
    def count(self) -> int:
        # Any rows will do for the count, not the latest: unordered, the first found.
        rows: QuerySet[UsageRecord] = self.object_list  # type: ignore[assignment]
        found = rows.order_by()[: LEDGER_LIST_MAX_ROWS + 1].count()
        self.capped = found > LEDGER_LIST_MAX_ROWS
        return min(found, LEDGER_LIST_MAX_ROWS)


class LedgerChangeList(ChangeList):
    """Sorts only by what `sortable_by` names: Django drops the other headers' links but
    still sorts by any column an `o=` in the address names."""

    def get_ordering_field(self, field_name: Any) -> Any:
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)


class LedgerProviderFilter(admin.SimpleListFilter):
    """The providers Tollgate knows (a DISTINCT over the ledger would read all of it)."""

    title = "provider"
    parameter_name = "provider"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Provider.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(provider=self.value()) if self.value() else queryset


class LedgerModelFilter(admin.SimpleListFilter):
    """The catalogue's models (a DISTINCT over the ledger would read all of it); a model
    since removed from the catalogue is still found with ?model=<name>."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = ModelPrice.objects.order_by("model").values_list("model", flat=True)
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(model=self.value()) if self.value() else queryset


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "request_id",
        "created_at",
        "user",
        "api_key",
        "model",
        "provider",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "cached",
        "fallback",
        "outcome",
        "latency_ms",
    )
    list_filter = ("cached", "fallback", "outcome", LedgerProviderFilter, LedgerModelFilter)
    # A key without a name is shown with its owner ("tg_<prefix> (alice)", ApiKey.__str__):
    # joined here, or each such row of the page costs a query of its own.
    list_select_related = ("user", "api_key__user")
    # Shows the search box; get_search_results says what a search finds.
    search_fields = ("^request_id", "user__username")
    search_help_text = "The start of a request id (case counts) or part of a username."
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    paginator = LedgerPaginator
    # Sorted by anything else (cost, tokens, user...), the page read and joined every row of
    # the ledger before keeping 100: 2.1-2.4 s at two million rows. These two are walked
    # down an index (the request id's unique one, `usage_day`).
    sortable_by = ("request_id", "created_at")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LedgerChangeList

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        queryset = super().get_queryset(request)
        return LedgerQuerySet(model=queryset.model, query=queryset.query, using=queryset.db)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UsageRecord], search_term: str
    ) -> tuple[QuerySet[UsageRecord], bool]:
        """The rows each word of the search finds, as Django's search would (words ANDed, a
        quoted phrase is one word): those whose request id starts with it, case counting
        (a client's id is kept as it was sent), and those of the users whose username
        contains it, in any case.

        PostgreSQL answers each side from an index and ORs the two (a BitmapOr): a request
        id's start is a `LIKE 'x%'` on request_id, which the `varchar_pattern_ops` index
        that Django creates beside the unique one serves (the unique index cannot under a
        non-C collation); the users are looked up first in their own small table, and
        their rows are a `user_id IN (...)`. Django's own search of `^request_id` and
        `user__username` is an `UPPER(request_id) LIKE` that no index serves, OR'ed with a
        condition on the joined user table: a read of the whole ledger (about 1.4 s at a
        million rows, docs/BENCHMARKS.md).
        """
        words = [
            unescape_string_literal(bit) if bit[0] in "\"'" and bit[0] == bit[-1] else bit
            for bit in smart_split(search_term)
        ]
        for word in words:
            user_ids = list(
                User.objects.filter(username__icontains=word).values_list("pk", flat=True)
            )
            queryset = queryset.filter(Q(request_id__startswith=word) | Q(user_id__in=user_ids))
        if words:
            # The rows a search finds are few: a DISTINCT over them beats walking the index.
            queryset = QuerySet(model=queryset.model, query=queryset.query, using=queryset.db)
        return queryset, False

    @admin.display(description="cost (USD)", ordering="cost_usd")
    def cost(self, obj: UsageRecord) -> str:
        return usd_text(obj.cost_usd)


@admin.register(DenialCount)
class DenialCountAdmin(ReadOnlyAdmin):
    list_display = ("day", "scope", "dimension", "count")
    list_filter = ("scope", "dimension")
    date_hierarchy = "day"
    ordering = ("-day", "scope", "dimension")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "actor",
        "object_type",
        "object_repr",
        "field",
        "old_value",
        "new_value",
    )
    list_filter = ("object_type", ("actor", admin.RelatedOnlyFieldListFilter), "field")
    list_select_related = ("actor",)
    search_fields = ("object_repr", "=object_id", "field")
    date_hierarchy = "created_at"

"""Governance data: plans, per-user quotas, API keys, the model catalogue, provider and
global limits, the usage ledger, refusal counts and the audit trail.

Money is `Decimal` USD here and integer micro-dollars in Redis. On a plan an empty limit
means unlimited; on a user override or a key it means "inherit" (the key's own limits are
an extra scope: empty there adds nothing).
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

DIMENSIONS = (
    "requests_per_minute",
    "requests_per_hour",
    "requests_per_day",
    "tokens_per_minute",
    "tokens_per_day",
    "cost_per_day",
    "cost_per_month",
    "concurrency",
)
MONEY_DIMENSIONS = ("cost_per_day", "cost_per_month")


def _money_field(verbose: str) -> models.DecimalField:
    return models.DecimalField(
        verbose,
        max_digits=14,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="USD. Empty: unlimited (on a plan) or inherit (on an override).",
    )


class LimitFields(models.Model):
    """The eight quota dimensions, named as in API.md."""

    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    requests_per_hour = models.PositiveIntegerField(null=True, blank=True)
    requests_per_day = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True)
    cost_per_day = _money_field("cost per day")
    cost_per_month = _money_field("cost per month")
    concurrency = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests in flight at once."
    )

    class Meta:
        abstract = True

    def limits(self) -> dict[str, int | Decimal | None]:
        return {name: getattr(self, name) for name in DIMENSIONS}


class Plan(LimitFields):
    name = models.CharField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Model names this plan may use; empty: all enabled."
    )
    allow_stale_fallback = models.BooleanField(
        default=True, help_text="Serve a stale cached answer when a quota is exhausted."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class UserQuota(LimitFields):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota"
    )
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.PROTECT)
    suspended = models.BooleanField(default=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "user quota"

    def __str__(self) -> str:
        return f"quota of {self.user}"


class ApiKey(LimitFields):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=8, unique=True, editable=False)
    secret_hash = models.CharField(
        max_length=64, editable=False, help_text="SHA-256 of the secret; the secret is not kept."
    )
    scopes = models.JSONField(default=list, blank=True, help_text="Empty: every scope.")
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "API key"
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"tg_{self.prefix} ({self.name or self.user})"

    @property
    def display(self) -> str:
        return f"tg_{self.prefix}"

    def is_expired(self, now: float | None = None) -> bool:
        if self.expires_at is None:
            return False
        return self.expires_at.timestamp() <= (
            now if now is not None else timezone.now().timestamp()
        )


class Provider(models.TextChoices):
    LOCAL = "local", "Local (offline)"
    OPENAI = "openai", "OpenAI-compatible"
    GEMINI = "gemini", "Google Gemini"


# The catalogue names of the offline provider's models, and only those, start with this, so
# that no one takes a canned answer for a real model's (API.md, DESIGN.md).
LOCAL_MODEL_PREFIX = "local/"


class ModelPrice(models.Model):
    model = models.CharField(max_length=100, unique=True, help_text="The name clients send.")
    provider = models.CharField(max_length=20, choices=Provider.choices)
    upstream_model = models.CharField(max_length=100, help_text="The name sent upstream.")
    input_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    output_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    context_window = models.PositiveIntegerField(default=8192)
    max_output_tokens = models.PositiveIntegerField(default=4096)
    enabled = models.BooleanField(default=True)

    class Meta:
        verbose_name = "model price"
        ordering = ("model",)

    def __str__(self) -> str:
        return self.model

    def clean(self) -> None:
        """A `local` entry is named `local/<name>` and a `local/` name is served by `local`.

        Raises ValidationError on the field to change: the name when the provider is
        `local`, the provider when the name starts with `local/`. Run by the admin's form
        (a model's `save()` does not call it).
        """
        super().clean()
        if not self.model or not self.provider:
            return  # the empty or invalid field has its own error
        local_name = self.model.startswith(LOCAL_MODEL_PREFIX)
        if self.provider == Provider.LOCAL and not local_name:
            message = (
                f"A model of the offline local provider is named “{LOCAL_MODEL_PREFIX}<name>”, "
                "so that no one takes its answers for a real model's."
            )
            raise ValidationError({"model": ValidationError(message, code="local_model_name")})
        if local_name and self.provider != Provider.LOCAL:
            message = (
                f"Names starting with “{LOCAL_MODEL_PREFIX}” are reserved for the offline "
                "local provider: choose it, or rename the model."
            )
            raise ValidationError({"provider": ValidationError(message, code="local_provider")})


def _default_safety_margin() -> Decimal:
    return Decimal(str(settings.QUOTA_SAFETY_MARGIN)).quantize(Decimal("0.01"))


class ProviderQuota(models.Model):
    """The upstream's own limits; Tollgate enforces them times the safety margin."""

    provider = models.CharField(max_length=20, choices=Provider.choices)
    model = models.CharField(max_length=100, blank=True, help_text="Blank: all its models.")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    requests_per_day = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True)
    safety_margin = models.DecimalField(
        max_digits=3,
        decimal_places=2,
        default=_default_safety_margin,
        help_text="Fraction of the upstream's limit Tollgate may use (0..1).",
    )

    class Meta:
        verbose_name = "provider quota"
        constraints = [
            models.UniqueConstraint(fields=("provider", "model"), name="provider_quota_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.provider}:{self.model or '*'}"


class GlobalLimits(models.Model):
    """One row: limits on all users together, and the priority shares of shared scopes."""

    cost_per_day = _money_field("cost per day")
    requests_per_hour = models.PositiveIntegerField(null=True, blank=True)
    concurrency = models.PositiveIntegerField(null=True, blank=True)
    low_share = models.DecimalField(max_digits=3, decimal_places=2, default=Decimal("0.50"))
    medium_share = models.DecimalField(max_digits=3, decimal_places=2, default=Decimal("0.70"))
    high_share = models.DecimalField(max_digits=3, decimal_places=2, default=Decimal("0.90"))
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = verbose_name_plural = "global limits"

    def __str__(self) -> str:
        return "global limits"

    @classmethod
    def load(cls) -> GlobalLimits:
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj


class Outcome(models.TextChoices):
    OK = "ok", "ok"
    CACHED = "cached", "cached"
    UPSTREAM_ERROR = "upstream_error", "upstream error"
    UPSTREAM_TIMEOUT = "upstream_timeout", "upstream timeout"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable", "upstream unavailable"
    ABANDONED = "abandoned", "abandoned"
    # Admitted while Redis was unreachable: the row holds the estimate until settlement.
    PENDING = "pending", "pending"


class UsageRecord(models.Model):
    """The ledger: one row per admitted request and per cache hit. Append-only."""

    request_id = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(ApiKey, null=True, on_delete=models.SET_NULL, related_name="+")
    model = models.CharField(max_length=100)
    provider = models.CharField(max_length=20)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    # Exact: tokens times a price per million with six decimals has at most twelve.
    cost_usd = models.DecimalField(max_digits=20, decimal_places=12, default=Decimal(0))
    cached = models.BooleanField(default=False)
    fallback = models.BooleanField(default=False)
    outcome = models.CharField(max_length=24, choices=Outcome.choices, default=Outcome.OK)
    latency_ms = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "usage record"
        indexes = [
            models.Index(fields=("user", "created_at"), name="usage_user_day"),
            models.Index(fields=("api_key", "created_at"), name="usage_key_day"),
            models.Index(fields=("provider", "model", "created_at"), name="usage_provider_day"),
            models.Index(fields=("created_at",), name="usage_day"),
            # The few rows admitted in fail-open and not settled yet (the sweep's look-up).
            models.Index(
                fields=("created_at",),
                name="usage_pending",
                condition=models.Q(outcome="pending"),
            ),
            # The few rows that are neither served nor a hit (failed, abandoned, pending) and
            # the stale fallbacks, which the admin's list filters on: a page of one outcome
            # is a range of it in time order, the fallbacks a read of this index alone
            # (migration 0005, built CONCURRENTLY).
            models.Index(
                fields=("outcome", "created_at", "fallback"),
                name="usage_unusual",
                condition=~models.Q(outcome__in=("ok", "cached")) | models.Q(fallback=True),
            ),
        ]

    def __str__(self) -> str:
        return self.request_id

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class DenialCount(models.Model):
    """Refusals per UTC day, scope and dimension (persisted from the live Redis counts)."""

    day = models.DateField()
    scope = models.CharField(max_length=16)
    dimension = models.CharField(max_length=32)
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("day", "scope", "dimension"), name="denial_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.scope}.{self.dimension}: {self.count}"


class AuditEntry(models.Model):
    """Who changed which limit, plan assignment, suspension or key state, and how."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    object_type = models.CharField(max_length=50)
    object_id = models.CharField(max_length=50)
    object_repr = models.CharField(max_length=200)
    field = models.CharField(max_length=50)
    # NULL is "no value" (a limit left empty), which an empty string would not say.
    old_value = models.TextField(blank=True, null=True)  # noqa: DJ001
    new_value = models.TextField(blank=True, null=True)  # noqa: DJ001

    class Meta:
        verbose_name = "audit entry"
        verbose_name_plural = "audit trail"
        ordering = ("-created_at",)
        indexes = [models.Index(fields=("object_type", "object_id"), name="audit_object")]

    def __str__(self) -> str:
        return f"{self.object_repr}.{self.field}: {self.old_value} -> {self.new_value}"


# Daily roll-ups of the ledger and budget alerts (declared in their own module).
from quotas.rollups import BudgetAlert, BudgetPeriod, DailyUsage  # noqa: E402, F401

"""Effective quota policy of a (user, key, model): value objects and their resolution.

A `Quota` is one limit of one scope on one dimension, in the engine's units (requests,
tokens, micro-dollars, leases); `None` never appears: an unlimited dimension has no Quota.
A limit of 0 refuses everything. The effective limit on a dimension is the tightest of all
scopes; every scope is checked, so the tightest one refuses first and is the one reported.

Counters are shared per principal: key scope -> `k:<id>`, user and plan scope -> `u:<id>`
(the plan's limit applies to each user on it unless the user overrides it), global -> `g`,
provider -> `p:<provider>:<model or *>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q

from config.errors import InvalidRequest
from quotas.errors import ModelNotAllowed, UserInactive, UserSuspended
from quotas.models import (
    DIMENSIONS,
    ApiKey,
    GlobalLimits,
    ModelPrice,
    Plan,
    ProviderQuota,
    UserQuota,
)

MICROS = Decimal(1_000_000)

# dimension -> (kind, window). kind: r requests, t tokens, c micro-dollars, l leases.
# window: seconds of a sliding window, or "day"/"month" for UTC calendar windows.
DIMENSION_SPECS: dict[str, tuple[str, int | str]] = {
    "requests_per_minute": ("r", 60),
    "requests_per_hour": ("r", 3600),
    "requests_per_day": ("r", "day"),
    "tokens_per_minute": ("t", 60),
    "tokens_per_day": ("t", "day"),
    "cost_per_day": ("c", "day"),
    "cost_per_month": ("c", "month"),
    "concurrency": ("l", 0),
}
PRIORITIES = ("critical", "high", "medium", "low")
SHARED_SCOPES = ("global", "provider")


def usd_to_micros(value: Decimal) -> int:
    """Micro-dollars, rounded up: a cost is counted at least at its exact value, so the
    ledger's exact total never passes a budget the counters held (limits have six decimals,
    which this keeps exactly)."""
    return int((value * MICROS).to_integral_value(rounding=ROUND_CEILING))


def micros_to_usd(value: int) -> Decimal:
    return (Decimal(value) / MICROS).quantize(Decimal("0.000001"))


def usd_text(value: Decimal) -> str:
    """USD as the contract writes it: at least six decimals ("0.000150"), and every further
    digit an exact cost has ("0.0005253": 1,234 tokens at 0.15 and 567 at 0.60 a million)."""
    exact = value.normalize()
    exponent = exact.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        return f"{exact:f}"
    return f"{value.quantize(Decimal('0.000001'))}"


def micros_text(micros: int) -> str:
    """A limit or a counter in USD as the standing writes it, with at least cents and no
    trailing zeros past them: "5.00", "0.1234", "0.000055"."""
    value = micros_to_usd(micros).normalize()
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        value = value.quantize(Decimal("0.01"))
    return f"{value:f}"


@dataclass(frozen=True, slots=True)
class Quota:
    scope: str  # key | user | plan | global | provider
    dimension: str
    limit: int  # engine units; 0 refuses all
    counter: str  # principal id in Redis keys

    @property
    def kind(self) -> str:
        return DIMENSION_SPECS[self.dimension][0]

    @property
    def window(self) -> int | str:
        return DIMENSION_SPECS[self.dimension][1]

    def scaled(self, share: Decimal) -> Quota:
        """The limit a priority may use of a shared scope (`_fraction_of`)."""
        if share >= 1:
            return self
        return Quota(self.scope, self.dimension, _fraction_of(self.limit, share), self.counter)

    def display_limit(self) -> int | str:
        return micros_text(self.limit) if self.kind == "c" else self.limit


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything admission and settlement need to know about one (user, key, model)."""

    user_id: int
    username: str
    key_id: int | None
    key_prefix: str | None
    plan: str | None
    model: str
    provider: str
    upstream_model: str
    input_per_million: Decimal
    output_per_million: Decimal
    max_output_tokens: int
    context_window: int
    allow_stale_fallback: bool
    quotas: tuple[Quota, ...]
    shares: dict[str, Decimal] = field(default_factory=dict)
    version: int = 0
    # Only a standing's policy (model None) may belong to a suspended user: any other
    # resolution refuses one.
    suspended: bool = False
    # When the key expires (epoch seconds), or None: the time passing bumps no policy
    # version, so a cached policy checks it itself.
    key_expires_at: float | None = None
    # quotas_for's answers: the policy itself is cached, so each priority's is built once.
    _by_priority: dict[str, tuple[Quota, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def quotas_for(self, priority: str) -> tuple[Quota, ...]:
        quotas = self._by_priority.get(priority)
        if quotas is None:
            share = self.shares.get(priority, Decimal(1))
            quotas = tuple(q.scaled(share) if q.scope in SHARED_SCOPES else q for q in self.quotas)
            self._by_priority[priority] = quotas
        return quotas

    def cost_of(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        """Exact cost in USD: prices per million have six decimals, so a cost has at most
        twelve, which the ledger keeps (the quota counters count it to the micro-dollar)."""
        return (
            Decimal(prompt_tokens) * self.input_per_million
            + Decimal(completion_tokens) * self.output_per_million
        ) / MICROS


def _fraction_of(limit: int, fraction: Decimal) -> int:
    """A fraction of a limit (a priority's share, a provider's safety margin), rounded
    down, in Decimal: a float product floors an exact one below it (90 x 0.7 is
    62.99999999999999). A positive fraction of a positive limit is at least 1: rounded to
    0 it would refuse everything, on an idle scope too (90% of a global concurrency of 1,
    80% of a provider's 1 request a minute), which only a fraction of 0 is meant to."""
    part = int((limit * fraction).to_integral_value(rounding=ROUND_FLOOR))
    return max(1, part) if limit > 0 and fraction > 0 else part


def _units(dimension: str, value: int | Decimal | None) -> int | None:
    if value is None:
        return None
    if DIMENSION_SPECS[dimension][0] == "c":
        return usd_to_micros(Decimal(value))
    return int(value)


# The price of "no model" (policy_resolve with model=None): an unsaved row, never charged.
_NO_MODEL_PRICE = ModelPrice(
    model="",
    provider="",
    upstream_model="",
    input_per_million=Decimal(0),
    output_per_million=Decimal(0),
    max_output_tokens=0,
    context_window=0,
)


def _default_plan() -> Plan | None:
    return Plan.objects.filter(name=settings.QUOTA_DEFAULT_PLAN).first()


def model_get(model: str) -> ModelPrice:
    """The catalogue entry of an enabled model; 400 invalid_request otherwise."""
    price = ModelPrice.objects.filter(model=model).first()
    if price is None or not price.enabled:
        raise InvalidRequest(
            f"Unknown or disabled model: {model!r}.", fields={"model": ["Unknown model."]}
        )
    return price


def global_quotas(glob: GlobalLimits) -> list[Quota]:
    """The quotas of the global scope (all users together)."""
    quotas = []
    for dim in ("cost_per_day", "requests_per_hour", "concurrency"):
        limit = _units(dim, getattr(glob, dim))
        if limit is not None:
            quotas.append(Quota("global", dim, limit, "g"))
    return quotas


def provider_quotas(row: ProviderQuota) -> list[Quota]:
    """The quotas of one provider row: the upstream's limits times its safety margin."""
    counter = f"p:{row.provider}:{row.model or '*'}"
    margin = Decimal(row.safety_margin)
    quotas = []
    for dim in ("requests_per_minute", "requests_per_day", "tokens_per_minute", "tokens_per_day"):
        value = getattr(row, dim)
        if value is not None:
            quotas.append(Quota("provider", dim, _fraction_of(value, margin), counter))
    return quotas


@dataclass(frozen=True, slots=True)
class _Principal:
    """Who is calling: the user, the key, the user's quota row and plan, and the models the
    key's scopes restrict it to (none: any)."""

    user: Any
    key: ApiKey | None
    user_quota: UserQuota | None
    plan: Plan | None
    key_models: tuple[str, ...]
    suspended: bool = False

    def allows(self, model: str) -> bool:
        """The plan's allowed models and the key's model scopes, where set, name `model`."""
        plan_models = self.plan.allowed_models if self.plan is not None else None
        return (not plan_models or model in plan_models) and (
            not self.key_models or model in self.key_models
        )


def _principal(user_id: int, key_id: int | None, *, suspended_ok: bool = False) -> _Principal:
    """The caller, checked: 401 for an inactive user or a revoked/expired key, 403 for a
    suspended user (unless `suspended_ok`: then it says so)."""
    from quotas.authentication import validate_key

    user = get_user_model().objects.get(pk=user_id)
    if not user.is_active:
        raise UserInactive()
    key: ApiKey | None = None
    if key_id is not None:
        key = ApiKey.objects.get(pk=key_id)
        validate_key(key, user)
    user_quota = UserQuota.objects.select_related("plan").filter(user_id=user_id).first()
    suspended = user_quota is not None and user_quota.suspended
    if suspended and not suspended_ok:
        raise UserSuspended()
    plan = user_quota.plan if user_quota is not None and user_quota.plan else _default_plan()
    key_models = tuple(
        s.removeprefix("model:") for s in (key.scopes if key else []) if s.startswith("model:")
    )
    return _Principal(user, key, user_quota, plan, key_models, suspended)


def models_allowed(*, user_id: int, key_id: int | None) -> list[ModelPrice]:
    """The enabled models of the catalogue this caller may use, by name (GET /v1/models).

    Raises as `policy_resolve` does for the caller itself (401, 403).
    """
    who = _principal(user_id, key_id)
    return [price for price in ModelPrice.objects.filter(enabled=True) if who.allows(price.model)]


def policy_resolve(
    *, user_id: int, key_id: int | None, model: str | None, version: int = 0
) -> Policy:
    """Read the effective policy from the database (a handful of indexed queries).

    Raises 401 for a revoked/expired key or an inactive user, 403 for a suspended user or a
    model the plan or key does not allow, 400 for an unknown or disabled model.

    `model=None`: the caller's own limits whatever model it calls (its standing, its
    rate-limit headers), with no model's price, model checks or provider scope; a
    suspended user gets its limits too, marked `suspended`.
    """
    who = _principal(user_id, key_id, suspended_ok=model is None)
    user, key, user_quota, plan = who.user, who.key, who.user_quota, who.plan
    price = model_get(model) if model is not None else _NO_MODEL_PRICE
    if model is not None and not who.allows(model):
        raise ModelNotAllowed()

    quotas: list[Quota] = []
    if key is not None:
        for dim in DIMENSIONS:
            limit = _units(dim, getattr(key, dim))
            if limit is not None:
                quotas.append(Quota("key", dim, limit, f"k:{key.pk}"))
    for dim in DIMENSIONS:
        override = getattr(user_quota, dim) if user_quota is not None else None
        if override is not None:
            quotas.append(Quota("user", dim, _units(dim, override) or 0, f"u:{user_id}"))
        elif plan is not None and getattr(plan, dim) is not None:
            quotas.append(Quota("plan", dim, _units(dim, getattr(plan, dim)) or 0, f"u:{user_id}"))

    glob = GlobalLimits.objects.filter(pk=1).first()
    shares = {
        "critical": Decimal(1),
        "high": Decimal("0.9"),
        "medium": Decimal("0.7"),
        "low": Decimal("0.5"),
    }
    if glob is not None:
        shares.update(
            high=Decimal(glob.high_share),
            medium=Decimal(glob.medium_share),
            low=Decimal(glob.low_share),
        )
        quotas += global_quotas(glob)

    # A provider-wide row and a row of this very model are both enforced, each on its own
    # counter.
    if model is not None:
        for row in ProviderQuota.objects.filter(
            Q(provider=price.provider) & (Q(model=price.model) | Q(model=""))
        ):
            quotas += provider_quotas(row)

    return Policy(
        user_id=user_id,
        username=user.get_username(),
        key_id=key.pk if key else None,
        key_prefix=key.prefix if key else None,
        plan=plan.name if plan else None,
        model=price.model,
        provider=price.provider,
        upstream_model=price.upstream_model,
        input_per_million=price.input_per_million,
        output_per_million=price.output_per_million,
        max_output_tokens=price.max_output_tokens,
        context_window=price.context_window,
        allow_stale_fallback=plan.allow_stale_fallback if plan else True,
        quotas=tuple(quotas),
        shares=shares,
        version=version,
        suspended=who.suspended,
        key_expires_at=key.expires_at.timestamp() if key and key.expires_at else None,
    )

"""Admin forms: checks the database cannot express (money and fractions in range, keys that
expire in the future, model names that exist) and lists typed as comma-separated names."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone

from quotas.models import DIMENSIONS, ApiKey, ModelPrice, Plan, Provider
from quotas.selectors import model_references

# Fields that hold USD amounts (must not be negative) and fractions (0..1), wherever they occur.
MONEY_FIELDS = ("cost_per_day", "cost_per_month", "input_per_million", "output_per_million")
FRACTION_FIELDS = ("safety_margin", "low_share", "medium_share", "high_share")
SCOPE_RE = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,100}$")


class NameListField(forms.CharField):
    """A list of names typed as "a, b, c" and stored as a JSON list (empty text: [])."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ", ".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        if isinstance(value, list | tuple):
            return [str(item) for item in value]
        text = super().to_python(value) or ""
        names: list[str] = []
        for part in text.replace("\n", ",").split(","):
            name = part.strip()
            if name and name not in names:
                names.append(name)
        return names


def scopes_validate(scopes: list[str], *, catalogue: bool = True) -> list[str]:
    """The scopes as given, or ValidationError naming the first malformed one, or (with
    `catalogue`) the first `model:<name>` whose model is not in the catalogue: the key could
    not use it, and a key whose model scopes are all misspelt could use no model at all."""
    from quotas.permissions import ENDPOINT_SCOPES, scope_is_known

    for scope in scopes:
        if not SCOPE_RE.match(scope) or not scope_is_known(scope):
            raise ValidationError(
                f"“{scope}” is not a valid scope: use "
                f"{', '.join(ENDPOINT_SCOPES)} or model:<name>.",
                code="invalid_scope",
            )
    if not catalogue:
        return scopes
    models = {scope.removeprefix("model:") for scope in scopes if scope.startswith("model:")}
    known = set(ModelPrice.objects.filter(model__in=models).values_list("model", flat=True))
    for scope in scopes:
        if scope.startswith("model:") and scope.removeprefix("model:") not in known:
            raise ValidationError(
                f"“{scope}”: the model is not in the model catalogue.", code="unknown_model"
            )
    return scopes


class GovernanceForm(forms.ModelForm):
    """Base form of every governance model: USD amounts >= 0, fractions within 0..1."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for name in MONEY_FIELDS:
            value = cleaned.get(name)
            if value is not None and value < 0:
                self.add_error(name, "An amount in USD cannot be negative.")
        for name in FRACTION_FIELDS:
            value = cleaned.get(name)
            if value is not None and not Decimal(0) <= value <= Decimal(1):
                self.add_error(name, "A fraction between 0 and 1.")
        return cleaned


class ModelPriceForm(GovernanceForm):
    """A catalogue entry whose token limits some request can meet."""

    def clean(self) -> dict[str, Any]:
        """A context window and an output limit of at least one token, the output within
        the window. With an output limit of 0, a request without `max_tokens` gets 0 (the
        default, capped by the model's limit) and is served an empty answer, its prompt
        charged, and any other is refused; an output limit past the window promises
        answers that the window refuses."""
        cleaned = super().clean()
        context_window = cleaned.get("context_window")
        max_output_tokens = cleaned.get("max_output_tokens")
        for name, value in (
            ("context_window", context_window),
            ("max_output_tokens", max_output_tokens),
        ):
            if value is not None and value < 1:
                self.add_error(name, "At least one token.")
        if context_window and max_output_tokens and max_output_tokens > context_window:
            self.add_error(
                "max_output_tokens",
                f"At most the context window ({context_window} tokens): the answer is part of it.",
            )
        self._check_references()
        return cleaned

    def _check_references(self) -> None:
        """A saved entry keeps its name, and its provider, while something names it there.

        A provider quota, a plan's allowed models, a key's `model:` scopes and the default
        model all name a model by name (and a provider quota by provider too): renamed, the
        model would slip out of its provider's limit, unnoticed, and be refused where it is
        allowed. The operator changes those first; disabling a model keeps them valid.
        """
        if self.instance.pk is None:
            return
        renamed = "model" in self.changed_data
        if not renamed and "provider" not in self.changed_data:
            return
        name, provider = self.initial["model"], self.initial["provider"]
        references = model_references(model=name, provider=provider, provider_only=not renamed)
        if not references:
            return
        if renamed:
            self.add_error(
                "model",
                f"“{name}” is still named by {'; '.join(references)}. Under a new name "
                "they would no longer reach it: change them first (a new name can be added "
                "as a catalogue entry of its own), or keep the name and disable the model "
                "instead.",
            )
        else:
            self.add_error(
                "provider",
                f"“{name}” is limited at {Provider(provider).label} by "
                f"{'; '.join(references)}: moved to another provider, it would escape that "
                "limit. Delete the limit first (and set one at the new provider once the "
                "model is moved).",
            )


class ProviderQuotaForm(GovernanceForm):
    """A provider's limits, of all its models or of one model of the catalogue."""

    def clean(self) -> dict[str, Any]:
        """A named model is a catalogue entry of this provider: the admission applies a
        row to the catalogue model of that name and provider only, so any other name
        (a typo, an upstream name, another provider's model) would be saved and never
        enforced."""
        cleaned = super().clean()
        provider, model = cleaned.get("provider"), cleaned.get("model")
        if (
            provider
            and model
            and not ModelPrice.objects.filter(model=model, provider=provider).exists()
        ):
            self.add_error(
                "model",
                f"“{model}” is not in the model catalogue as a model of "
                f"{Provider(provider).label}: a limit on it would never apply. Use the "
                "catalogue's name, or leave it blank for all the provider's models.",
            )
        return cleaned


class GlobalLimitsForm(GovernanceForm):
    """The global limits, with priority shares in priority order."""

    def clean(self) -> dict[str, Any]:
        """low <= medium <= high (critical has all): a lower priority is refused first as
        a shared scope fills up (DESIGN.md), never a higher one."""
        cleaned = super().clean()
        low, medium, high = (cleaned.get(f"{p}_share") for p in ("low", "medium", "high"))
        if low is not None and medium is not None and medium < low:
            self.add_error("medium_share", "At least the low priority's share.")
        if medium is not None and high is not None and high < medium:
            self.add_error("high_share", "At least the medium priority's share.")
        return cleaned


class PlanForm(GovernanceForm):
    allowed_models = NameListField(
        required=False,
        help_text="Catalogue model names, separated by commas. Empty: every enabled model.",
    )

    class Meta:
        model = Plan
        fields = ("name", "description", *DIMENSIONS, "allowed_models", "allow_stale_fallback")

    def clean_name(self) -> str:
        """The default plan keeps its name: users without a quota row of their own are on
        the plan QUOTA_DEFAULT_PLAN names, and renamed it would leave them without plan
        limits, unnoticed."""
        name: str = self.cleaned_data["name"]
        was = self.initial.get("name") if self.instance.pk is not None else None
        if was == settings.QUOTA_DEFAULT_PLAN and name != was:
            raise ValidationError(
                f"“{was}” is the default plan (QUOTA_DEFAULT_PLAN) of every user without a "
                "quota of their own: renamed, it would leave them without plan limits. "
                "Change its limits instead, or set QUOTA_DEFAULT_PLAN to another plan first."
            )
        return name

    def clean_allowed_models(self) -> list[str]:
        names: list[str] = self.cleaned_data["allowed_models"]
        known = set(ModelPrice.objects.filter(model__in=names).values_list("model", flat=True))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValidationError(f"Not in the model catalogue: {', '.join(unknown)}.")
        return names


class ApiKeyForm(GovernanceForm):
    """The change form of a key: its name, scopes, expiry and own limits."""

    scopes = NameListField(
        required=False,
        help_text="Separated by commas, e.g. “generate, model:local/demo”. Empty: every scope.",
    )

    class Meta:
        model = ApiKey
        fields: tuple[str, ...] = ("name", "scopes", "expires_at", *DIMENSIONS)

    def clean_scopes(self) -> list[str]:
        """Scopes left as they were may name a model since removed from the catalogue, so
        that the key's other fields can still be edited (as an expiry already past can)."""
        changed = "scopes" in self.changed_data
        return scopes_validate(self.cleaned_data["scopes"], catalogue=changed)

    def clean_expires_at(self) -> Any:
        """A new expiry lies in the future (revoke a key to stop it now); an expiry left as
        it was may be past, so that an expired key's name or limits can still be edited."""
        expires_at = self.cleaned_data.get("expires_at")
        changed = "expires_at" in self.changed_data
        if changed and expires_at is not None and expires_at <= timezone.now():
            raise ValidationError(
                "The expiry must be in the future; to stop a key now, revoke it.",
                code="expiry_past",
            )
        return expires_at


class ApiKeyCreateForm(ApiKeyForm):
    """The add form: the key itself (prefix and hash) is generated on save."""

    class Meta(ApiKeyForm.Meta):
        fields = ("user", "name", "scopes", "expires_at", *DIMENSIONS)

    def clean_user(self) -> Any:
        user = self.cleaned_data["user"]
        if user is not None and not user.is_active:
            raise ValidationError("This user is inactive; a key of theirs would be refused.")
        return user

    def clean_expires_at(self) -> Any:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise ValidationError("The expiry must be in the future.")
        return expires_at

    def limits(self) -> dict[str, Any]:
        """The per-key limits the operator filled in (empty ones are not limits)."""
        return {
            name: self.cleaned_data[name]
            for name in DIMENSIONS
            if self.cleaned_data.get(name) is not None
        }

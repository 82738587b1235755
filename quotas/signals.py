"""Audit trail and live policy invalidation.

Any save or delete of governance data (through the admin, the ORM or a command) bumps the
policy version once the transaction commits; every worker sees the new version in its next
admission reply and reloads, so a change holds everywhere within a second. Changes of
limits, plan assignments, suspensions, key revocations and a user's deactivation (which
bumps the version too) are written to the audit trail.

A day or month counter is kept in Redis only while some limit of its window applies to
its principal. A change that may make one apply again (a calendar limit set where there
was none, a user moved to another plan) also rotates the counter epoch, so that such
counters are rebuilt from the ledger, which holds what was spent while no one counted.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from quotas.audit import current_actor
from quotas.engine import BackendUnavailable
from quotas.models import (
    DIMENSIONS,
    ApiKey,
    AuditEntry,
    GlobalLimits,
    ModelPrice,
    Plan,
    ProviderQuota,
    UserQuota,
)

GOVERNED = (Plan, UserQuota, ApiKey, ModelPrice, ProviderQuota, GlobalLimits)
AUDITED_FIELDS: dict[type, tuple[str, ...]] = {
    Plan: (*DIMENSIONS, "allowed_models", "allow_stale_fallback"),
    UserQuota: (*DIMENSIONS, "plan_id", "suspended"),
    ApiKey: (*DIMENSIONS, "scopes", "expires_at", "revoked_at"),
    # A catalogue entry's name and provider are what the rest names it by (a rename is what
    # clients must send from then on); its upstream name and window are what it serves.
    ModelPrice: (
        "model",
        "provider",
        "upstream_model",
        "input_per_million",
        "output_per_million",
        "enabled",
        "context_window",
        "max_output_tokens",
    ),
    ProviderQuota: (
        "provider",
        "model",
        "requests_per_minute",
        "requests_per_day",
        "tokens_per_minute",
        "tokens_per_day",
        "safety_margin",
    ),
    GlobalLimits: (
        "cost_per_day",
        "requests_per_hour",
        "concurrency",
        "low_share",
        "medium_share",
        "high_share",
    ),
}


# The limits kept in calendar counters (see the module's docstring).
CALENDAR_DIMENSIONS = ("requests_per_day", "tokens_per_day", "cost_per_day", "cost_per_month")
logger = logging.getLogger("tollgate.quotas")


def _bump() -> None:
    from quotas.services import policy_bump

    policy_bump()


def _recount() -> None:
    from quotas.services import counters_rebuild_all

    try:
        counters_rebuild_all()
    except BackendUnavailable:
        # Redis is away: its return rotates the epoch anyway (admission's `_recover`).
        logger.warning("counter epoch not rotated: quota backend unavailable")


def _starts_counting(sender: Any, instance: Any, old: dict[str, Any], created: bool) -> bool:
    """Whether this save may make a calendar counter count again that was not counting: a
    calendar limit set where there was none, or a user's plan changed (a user quota
    created or given another plan). A new key's counters are new: they start from the
    ledger anyway."""
    if sender is ApiKey and created:
        return False
    if sender is UserQuota and (created or old.get("plan_id") != instance.plan_id):
        return True
    return any(
        getattr(instance, dim, None) is not None and (created or old.get(dim) is None)
        for dim in CALENDAR_DIMENSIONS
        if dim in AUDITED_FIELDS[sender]
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


@receiver(pre_save)
def _remember_old(sender: Any, instance: Any, **kwargs: Any) -> None:
    if sender not in AUDITED_FIELDS or instance.pk is None or kwargs.get("raw"):
        return
    fields = AUDITED_FIELDS[sender]
    old = sender.objects.filter(pk=instance.pk).values(*fields).first()
    instance._audit_old = old


@receiver(post_save)
def _audit_and_bump(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if sender not in GOVERNED or kwargs.get("raw"):
        return
    old = getattr(instance, "_audit_old", None) or {}
    actor = current_actor.get()
    entries = []
    for field in AUDITED_FIELDS[sender]:
        new_value = getattr(instance, field)
        old_value = old.get(field) if not created else None
        if created and new_value in (None, [], False, ""):
            continue
        if not created and old_value == new_value:
            continue
        entries.append(
            AuditEntry(
                actor=actor if getattr(actor, "pk", None) else None,
                object_type=str(sender._meta.model_name),
                object_id=str(instance.pk),
                object_repr=str(instance)[:200],
                field=field.removesuffix("_id"),
                old_value=_text(old_value),
                new_value=_text(new_value),
            )
        )
    if entries:
        AuditEntry.objects.bulk_create(entries)
    instance._audit_old = None
    if _starts_counting(sender, instance, old, created):
        transaction.on_commit(_recount)
    transaction.on_commit(_bump)


@receiver(pre_save, sender=settings.AUTH_USER_MODEL)
def _remember_active(sender: Any, instance: Any, **kwargs: Any) -> None:
    update_fields = kwargs.get("update_fields")
    instance._was_active = None
    if instance.pk is None or kwargs.get("raw"):
        return
    if update_fields is not None and "is_active" not in update_fields:
        return  # a login's last_login, and the like: no query
    instance._was_active = (
        sender.objects.filter(pk=instance.pk).values_list("is_active", flat=True).first()
    )


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def _bump_on_activation(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    """A user deactivated or reactivated: refused or let through everywhere within a
    second, by admission too (a batch job's items are admitted without a new
    authentication), as a suspension is. Other saves of a user bump nothing."""
    was_active = getattr(instance, "_was_active", None)
    instance._was_active = None
    if created or was_active is None or was_active == instance.is_active:
        return
    actor = current_actor.get()
    AuditEntry.objects.create(
        actor=actor if getattr(actor, "pk", None) else None,
        object_type=str(sender._meta.model_name),
        object_id=str(instance.pk),
        object_repr=str(instance)[:200],
        field="is_active",
        old_value=str(was_active),
        new_value=str(instance.is_active),
    )
    transaction.on_commit(_bump)


@receiver(post_delete)
def _bump_on_delete(sender: Any, instance: Any, **kwargs: Any) -> None:
    if sender in GOVERNED:
        AuditEntry.objects.create(
            actor=current_actor.get() if getattr(current_actor.get(), "pk", None) else None,
            object_type=str(sender._meta.model_name),
            object_id=str(instance.pk),
            object_repr=str(instance)[:200],
            field="(deleted)",
        )
        if sender is UserQuota:  # the user falls back to the default plan
            transaction.on_commit(_recount)
        transaction.on_commit(_bump)

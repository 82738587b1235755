from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest
from django import forms
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from config.errors import InvalidRequest
from quotas import keys
from quotas.errors import QuotaExceeded
from quotas.models import (
    ApiKey,
    AuditEntry,
    DenialCount,
    GlobalLimits,
    ModelPrice,
    Plan,
    ProviderQuota,
    UsageRecord,
    UserQuota,
)
from quotas.policy import policy_resolve
from quotas.services import admission_admit, key_create
from quotas.tests.factories import PlanFactory, UserFactory, UserQuotaFactory

pytestmark = pytest.mark.django_db

KEY_RE = re.compile(r"tg_[a-z0-9]{8}_[A-Za-z0-9_-]{32,128}")


def _url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _form_data(response) -> dict[str, Any]:
    """The POST body a browser would send for the admin form as rendered (with inlines)."""
    data: dict[str, Any] = {}
    rendered = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        rendered.append(inline.formset.management_form)
        rendered.extend(inline.formset.forms)
    for form in rendered:
        for name, field in form.fields.items():
            bound = form[name]
            value = bound.value()
            if field.disabled:
                continue
            if isinstance(field.widget, forms.MultiWidget):
                parts = field.widget.decompress(value)
                for i, part in enumerate(parts):
                    data[f"{bound.html_name}_{i}"] = "" if part is None else str(part)
            elif isinstance(field.widget, forms.CheckboxInput):
                if value:
                    data[bound.html_name] = "on"
            elif isinstance(value, list | tuple):
                data[bound.html_name] = [str(item) for item in value]
            else:
                data[bound.html_name] = "" if value is None else str(value)
    return data


def _edit(client, model: type, obj_id: int, /, **changes: Any):
    url = _url(model, "change", obj_id)
    data = _form_data(client.get(url))
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)
        else:
            data[name] = value
    return client.post(url, data)


def _action(client, model: type, action: str, ids: list[int]):
    return client.post(
        _url(model, "changelist"), {"action": action, "_selected_action": [str(i) for i in ids]}
    )


@pytest.fixture
def governance(local_model):
    plan = PlanFactory(name="gold", requests_per_minute=10, cost_per_day=Decimal("5.00"))
    quota = UserQuotaFactory(user=UserFactory(username="carol"), plan=plan)
    _, key = key_create(user=quota.user, name="ci")
    usage = UsageRecord.objects.create(
        request_id="req-admin-1",
        user=quota.user,
        api_key=key,
        model="local/demo",
        provider="local",
        prompt_tokens=3,
        completion_tokens=4,
        cost_usd=Decimal("0.000012"),
    )
    return {
        Plan: plan,
        UserQuota: quota,
        ApiKey: key,
        ModelPrice: local_model,
        ProviderQuota: ProviderQuota.objects.create(provider="local", requests_per_minute=100),
        GlobalLimits: GlobalLimits.load(),
        UsageRecord: usage,
        DenialCount: DenialCount.objects.create(
            day=dt.date(2026, 3, 1), scope="user", dimension="requests_per_minute", count=3
        ),
        AuditEntry: AuditEntry.objects.create(
            object_type="plan",
            object_id=str(plan.pk),
            object_repr="gold",
            field="requests_per_minute",
            old_value="5",
            new_value="10",
        ),
    }


MODELS = (
    Plan,
    UserQuota,
    ApiKey,
    ModelPrice,
    ProviderQuota,
    GlobalLimits,
    UsageRecord,
    DenialCount,
    AuditEntry,
)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_admin_changelist_and_change_page_load_for_each_model(admin_client, governance, model):
    obj = governance[model]

    assert admin_client.get(_url(model, "changelist")).status_code == 200
    page = admin_client.get(_url(model, "change", obj.pk))

    assert page.status_code == 200
    assert escape(str(obj)) in page.content.decode()


@pytest.mark.parametrize(
    "model", [Plan, UserQuota, ApiKey, ModelPrice, ProviderQuota], ids=lambda m: m.__name__
)
def test_admin_add_page_loads_for_each_editable_model(admin_client, model):
    assert admin_client.get(_url(model, "add")).status_code == 200


def test_admin_user_pages_load_with_quota_inline(admin_client, governance):
    user = governance[UserQuota].user

    key_listing = admin_client.get(_url(ApiKey, "changelist")).content.decode()
    assert '<td class="field-scope_list">(all)</td>' in key_listing
    listing = admin_client.get(reverse("admin:auth_user_changelist"))
    page = admin_client.get(reverse("admin:auth_user_change", args=(user.pk,)))

    assert listing.status_code == 200
    assert "gold" in listing.content.decode()
    assert page.status_code == 200
    formset_models = [f.formset.model for f in page.context["inline_admin_formsets"]]
    assert formset_models == [UserQuota, ApiKey]
    assert admin_client.get(reverse("admin:auth_user_add")).status_code == 200


def test_user_page_shows_live_usage_against_each_limit(admin_client, governance, redis_conn):
    user = governance[UserQuota].user
    admission_admit(
        user_id=user.pk,
        key_id=None,
        model="local/demo",
        request_id="live-1",
        prompt_tokens=10,
        max_tokens=20,
    )

    page = admin_client.get(reverse("admin:auth_user_change", args=(user.pk,)))

    html = page.content.decode()
    assert "Plan: <strong>gold</strong>" in html
    # requests per minute: limit 10, one request in flight, 9 remaining.
    assert re.search(
        r"<td>requests per minute</td>\s*<td>10</td>\s*<td>1</td>\s*<td>9</td>"
        r"\s*<td>1 min \d+ s</td>",
        html,
    )
    assert re.search(r"<td>cost per day</td>\s*<td>5.00</td>\s*<td>0.0000\d\d</td>", html)
    # Unlimited: what the ledger holds of the day all the same, nothing remaining or resetting.
    assert re.search(
        r"<td>tokens per day</td>\s*<td>unlimited</td>\s*<td>\d+</td>\s*<td>-</td>"
        r"\s*<td>-</td>",
        html,
    )


def test_key_page_shows_the_keys_own_tighter_limit_and_links_its_ledger_rows(
    admin_client, governance, redis_conn
):
    key = governance[ApiKey]
    ApiKey.objects.filter(pk=key.pk).update(requests_per_minute=3)
    other = UsageRecord.objects.create(
        request_id="req-other-user", user=UserFactory(), model="local/demo", provider="local"
    )

    page = admin_client.get(_url(ApiKey, "change", key.pk))

    html = page.content.decode()
    assert f"key <strong>tg_{key.prefix}</strong>" in html
    assert re.search(r"<td>requests per minute</td>\s*<td>3</td>\s*<td>0</td>\s*<td>3</td>", html)
    ledger_url = re.search(r'<a href="([^"]+)">usage records</a>', html).group(1)
    listed = admin_client.get(ledger_url.replace("&amp;", "&"))
    rows = [r.request_id for r in listed.context["cl"].result_list]
    assert rows == ["req-admin-1"]
    assert other.request_id not in rows


def test_user_page_renders_when_live_usage_fails(admin_client, governance, monkeypatch):
    from quotas import services

    def broken(**kwargs):
        raise ConnectionError("quota backend down")

    monkeypatch.setattr(services, "quota_standing", broken)
    user = governance[UserQuota].user

    page = admin_client.get(reverse("admin:auth_user_change", args=(user.pk,)))

    assert page.status_code == 200
    assert "Live usage is unavailable right now" in page.content.decode()
    assert "quota backend down" in page.content.decode()


# --- API keys ---


def _add_key(client, user, **extra: Any):
    data = {
        "user": str(user.pk),
        "name": "from the admin",
        "scopes": "generate, model:local/demo",
        "expires_at_0": "",
        "expires_at_1": "",
        "requests_per_minute": "",
        "requests_per_hour": "",
        "requests_per_day": "",
        "tokens_per_minute": "",
        "tokens_per_day": "",
        "cost_per_day": "",
        "cost_per_month": "",
        "concurrency": "",
    }
    data.update(extra)
    return client.post(_url(ApiKey, "add"), data)


def _rows_containing(text: str) -> list[str]:
    """Every table of the public schema whose row text contains `text`."""
    found = []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        for (table,) in cursor.fetchall():
            cursor.execute(
                f'SELECT count(*) FROM "{table}" AS t WHERE t::text LIKE %s',  # noqa: S608
                [f"%{text}%"],
            )
            if cursor.fetchone()[0]:
                found.append(table)
    return found


def test_key_add_shows_the_key_once_and_stores_only_prefix_and_hash(
    admin_client, user, local_model, api_client
):
    expires = timezone.now() + dt.timedelta(days=10)

    page = _add_key(
        admin_client,
        user,
        expires_at_0=expires.date().isoformat(),
        expires_at_1="12:00:00",
        requests_per_minute="7",
        cost_per_day="0.50",
    )

    assert page.status_code == 200
    assert "no-store" in page["Cache-Control"]
    html = page.content.decode()
    full_key = KEY_RE.search(html).group(0)
    prefix, secret = keys.key_parse(full_key)
    key = ApiKey.objects.get()
    assert (key.prefix, key.user, key.name) == (prefix, user, "from the admin")
    assert key.secret_hash == keys.hash_secret(secret)
    assert key.scopes == ["generate", "model:local/demo"]
    assert (key.requests_per_minute, key.cost_per_day) == (7, Decimal("0.50"))
    assert key.expires_at.date() == expires.date()
    # Neither the secret nor the whole key is in any column of any table.
    with connection.cursor() as cursor:
        cursor.execute("SELECT t::text FROM quotas_apikey AS t")
        (row_text,) = cursor.fetchone()
    assert secret not in row_text
    assert _rows_containing(secret) == []
    # Never shown again: not on the key's page, not in the list, not in the history.
    for url in (
        _url(ApiKey, "change", key.pk),
        _url(ApiKey, "changelist"),
        _url(ApiKey, "history", key.pk),
    ):
        later = admin_client.get(url).content.decode()
        assert secret not in later
        assert f"tg_{prefix}" in later
    # And it works.
    response = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {full_key}")
    assert response.status_code == 200
    assert response.json()["key"] == f"tg_{prefix}"


def test_key_add_each_save_makes_a_different_key(admin_client, user, local_model):
    first = KEY_RE.search(_add_key(admin_client, user).content.decode()).group(0)
    second = KEY_RE.search(_add_key(admin_client, user).content.decode()).group(0)

    assert first != second
    assert ApiKey.objects.count() == 2


def test_key_add_refuses_past_expiry_bad_scope_and_inactive_user(admin_client, user):
    past = _add_key(admin_client, user, expires_at_0="2020-01-01", expires_at_1="00:00:00")
    bad_scope = _add_key(admin_client, user, scopes="generate, two words")
    inactive = UserFactory(username="gone", is_active=False)
    refused_user = _add_key(admin_client, inactive)

    assert past.status_code == bad_scope.status_code == refused_user.status_code == 200
    assert "must be in the future" in past.content.decode()
    assert "is not a valid scope" in bad_scope.content.decode()
    assert "inactive" in refused_user.content.decode()
    assert not KEY_RE.search(past.content.decode() + bad_scope.content.decode())
    assert ApiKey.objects.count() == 0


def test_key_scopes_name_catalogue_models_only(admin_client, user, local_model):
    refused = _add_key(admin_client, user, scopes="generate, model:local/dmeo")
    kept = _add_key(admin_client, user, scopes="generate, model:local/demo")

    assert refused.status_code == 200
    assert "model:local/dmeo" in refused.context["adminform"].form.errors["scopes"][0]
    assert KEY_RE.search(kept.content.decode())
    assert list(ApiKey.objects.values_list("scopes", flat=True)) == [
        ["generate", "model:local/demo"]
    ]
    key = ApiKey.objects.get()
    local_model.delete()
    # Scopes left as they were may name a model since removed: the key stays editable.
    assert _edit(admin_client, ApiKey, key.pk, name="renamed").status_code == 302
    changed = _edit(admin_client, ApiKey, key.pk, scopes="model:local/demo, model:local/x")
    assert "model:local/demo" in changed.context["adminform"].form.errors["scopes"][0]


def test_key_change_refuses_a_new_expiry_in_the_past_but_keeps_an_old_one(admin_client, api_key):
    full_key, key = api_key

    past = _edit(admin_client, ApiKey, key.pk, expires_at_0="2020-01-01", expires_at_1="00:00")

    assert past.status_code == 200
    assert "The expiry must be in the future" in past.content.decode()
    key.refresh_from_db()
    assert key.expires_at is None
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - dt.timedelta(days=1))
    renamed = _edit(admin_client, ApiKey, key.pk, name="renamed while expired")
    assert renamed.status_code == 302
    key.refresh_from_db()
    assert key.name == "renamed while expired"
    later = timezone.now() + dt.timedelta(days=10)
    extended = _edit(
        admin_client,
        ApiKey,
        key.pk,
        expires_at_0=later.strftime("%Y-%m-%d"),
        expires_at_1=later.strftime("%H:%M:%S"),
    )
    assert extended.status_code == 302


def test_key_change_form_keeps_credentials_read_only(admin_client, api_key):
    full_key, key = api_key
    stored = (key.prefix, key.secret_hash, key.user_id)

    response = _edit(
        admin_client,
        ApiKey,
        key.pk,
        name="renamed",
        scopes="generate",
        prefix="zzzzzzzz",
        secret_hash="0" * 64,
        user=str(UserFactory().pk),
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.name == "renamed"
    assert key.scopes == ["generate"]
    assert (key.prefix, key.secret_hash, key.user_id) == stored


def test_revoke_action_revokes_records_the_actor_and_refuses_the_key(
    admin_client, admin_user, user, api_client, local_model
):
    full_key, key = key_create(user=user, name="live")
    _, old = key_create(user=user, name="old")
    earlier = timezone.now() - dt.timedelta(days=3)
    ApiKey.objects.filter(pk=old.pk).update(revoked_at=earlier)

    response = _action(admin_client, ApiKey, "revoke", [key.pk, old.pk])

    assert response.status_code == 302
    key.refresh_from_db()
    old.refresh_from_db()
    assert key.revoked_at is not None
    assert old.revoked_at == earlier
    entry = AuditEntry.objects.get(object_type="apikey", object_id=str(key.pk), field="revoked_at")
    assert entry.actor == admin_user
    assert entry.old_value is None
    refused = api_client.get("/api/v1/quota", HTTP_AUTHORIZATION=f"Bearer {full_key}")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "key_revoked"


def test_extend_action_adds_30_days_and_leaves_unexpiring_and_revoked_keys(
    admin_client, admin_user, user
):
    now = timezone.now()
    _, soon = key_create(user=user, expires_at=now + dt.timedelta(days=5))
    _, expired = key_create(user=user, expires_at=now - dt.timedelta(days=2))
    _, forever = key_create(user=user)
    _, revoked = key_create(user=user, expires_at=now + dt.timedelta(days=5))
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=now)

    before = timezone.now()
    _action(admin_client, ApiKey, "extend_expiry", [soon.pk, expired.pk, forever.pk, revoked.pk])
    after = timezone.now()

    for key in (soon, expired, forever, revoked):
        key.refresh_from_db()
    assert soon.expires_at == now + dt.timedelta(days=35)
    assert before + dt.timedelta(days=30) <= expired.expires_at <= after + dt.timedelta(days=30)
    assert forever.expires_at is None
    assert revoked.expires_at == now + dt.timedelta(days=5)
    entry = AuditEntry.objects.get(
        object_type="apikey", object_id=str(soon.pk), field="expires_at", actor__isnull=False
    )
    assert entry.actor == admin_user


def test_key_status_filter_separates_active_expired_and_revoked(admin_client, user):
    now = timezone.now()
    _, active = key_create(user=user, name="active-key")
    _, expired = key_create(user=user, name="expired-key", expires_at=now - dt.timedelta(1))
    _, revoked = key_create(user=user, name="revoked-key")
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=now)

    def listed(status):
        response = admin_client.get(_url(ApiKey, "changelist"), {"status": status})
        return {key.pk for key in response.context["cl"].result_list}

    assert listed("active") == {active.pk}
    assert listed("expired") == {expired.pk}
    assert listed("revoked") == {revoked.pk}


# --- Audit trail and governance edits ---


def test_plan_limit_changed_in_the_change_form_is_audited_with_the_actor(
    admin_client, admin_user, governance
):
    plan = governance[Plan]

    response = _edit(admin_client, Plan, plan.pk, requests_per_minute="20")

    assert response.status_code == 302
    plan.refresh_from_db()
    assert plan.requests_per_minute == 20
    entries = list(
        AuditEntry.objects.filter(object_type="plan", object_id=str(plan.pk), actor__isnull=False)
    )
    assert [(e.field, e.old_value, e.new_value, e.actor) for e in entries] == [
        ("requests_per_minute", "10", "20", admin_user)
    ]
    trail = admin_client.get(
        _url(AuditEntry, "changelist"), {"object_type": "plan", "actor__id__exact": admin_user.pk}
    )
    assert [e.pk for e in trail.context["cl"].result_list] == [entries[0].pk]


def test_suspension_through_the_user_page_is_audited_with_the_actor(
    admin_client, admin_user, governance
):
    quota = governance[UserQuota]

    response = _edit(admin_client, type(quota.user), quota.user.pk, **{"quota-0-suspended": "on"})

    assert response.status_code == 302, response.context and response.context["errors"]
    quota.refresh_from_db()
    assert quota.suspended is True
    entry = AuditEntry.objects.get(object_type="userquota", field="suspended")
    assert (entry.old_value, entry.new_value, entry.actor) == ("False", "True", admin_user)


def test_deleting_a_provider_quota_in_the_admin_is_audited_with_the_actor(
    admin_client, admin_user, governance
):
    row = governance[ProviderQuota]

    response = admin_client.post(_url(ProviderQuota, "delete", row.pk), {"post": "yes"})

    assert response.status_code == 302
    assert not ProviderQuota.objects.filter(pk=row.pk).exists()
    entry = AuditEntry.objects.get(
        object_type="providerquota", object_id=str(row.pk), field="(deleted)"
    )
    assert entry.actor == admin_user


def test_plan_form_refuses_unknown_models_and_negative_money(admin_client, governance):
    plan = governance[Plan]

    response = _edit(
        admin_client, Plan, plan.pk, allowed_models="local/demo, nope/x", cost_per_day="-1"
    )

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "nope/x" in str(errors["allowed_models"])
    assert "cost_per_day" in errors
    plan.refresh_from_db()
    assert plan.cost_per_day == Decimal("5.00")


def test_plan_allowed_models_are_stored_as_a_list(admin_client, governance):
    plan = governance[Plan]

    _edit(admin_client, Plan, plan.pk, allowed_models="local/demo")

    plan.refresh_from_db()
    assert plan.allowed_models == ["local/demo"]


def test_global_limits_is_a_singleton_without_delete(admin_client):
    assert admin_client.get(_url(GlobalLimits, "add")).status_code == 200
    response = admin_client.post(
        _url(GlobalLimits, "add"),
        {
            "cost_per_day": "100",
            "requests_per_hour": "",
            "concurrency": "",
            "high_share": "0.9",
            "medium_share": "0.7",
            "low_share": "0.5",
        },
    )
    assert response.status_code == 302
    row = GlobalLimits.objects.get()
    assert row.pk == 1
    assert row.cost_per_day == Decimal(100)

    assert admin_client.get(_url(GlobalLimits, "add")).status_code == 403
    assert (
        admin_client.post(_url(GlobalLimits, "delete", row.pk), {"post": "yes"}).status_code == 403
    )
    assert GlobalLimits.objects.count() == 1


def test_global_limits_share_outside_zero_to_one_is_refused(admin_client):
    row = GlobalLimits.load()

    response = _edit(admin_client, GlobalLimits, row.pk, low_share="1.50")

    assert response.status_code == 200
    assert "low_share" in response.context["adminform"].form.errors


@pytest.mark.parametrize(
    ("model", "provider"),
    [("local/dmeo", "local"), ("local/demo", "openai")],
    ids=["misspelt", "another-providers-model"],
)
def test_provider_quota_for_a_model_it_would_never_apply_to_is_refused(
    admin_client, local_model, model, provider
):
    # A provider row of a model applies to the catalogue entry of that name and provider
    # (policy_resolve): any other name would be saved and never enforced.
    data = {"provider": provider, "model": model, "requests_per_minute": "10"}
    response = admin_client.post(_url(ProviderQuota, "add"), {**data, "safety_margin": "0.8"})

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["model"]
    assert "not in the model catalogue" in errors["model"][0]
    assert not ProviderQuota.objects.exists()


def test_provider_quota_of_a_catalogue_model_or_of_all_models_is_saved(admin_client, local_model):
    for model in ("local/demo", ""):
        data = {"provider": "local", "model": model, "requests_per_minute": "10"}
        response = admin_client.post(_url(ProviderQuota, "add"), {**data, "safety_margin": "0.8"})
        assert response.status_code == 302

    assert sorted(ProviderQuota.objects.values_list("model", flat=True)) == ["", "local/demo"]


def test_global_limits_shares_out_of_priority_order_are_refused(admin_client):
    row = GlobalLimits.load()

    response = _edit(
        admin_client, GlobalLimits, row.pk, low_share="0.90", medium_share="0.70", high_share="0.50"
    )

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "medium_share" in errors
    assert "high_share" in errors
    row.refresh_from_db()
    assert (row.low_share, row.high_share) == (Decimal("0.50"), Decimal("0.90"))
    equal = _edit(
        admin_client, GlobalLimits, row.pk, low_share="0.60", medium_share="0.60", high_share="0.60"
    )
    assert equal.status_code == 302


# --- The model catalogue ---


def _price_add(client, **fields: str):
    data = {
        "model": "local/echo",
        "provider": "local",
        "upstream_model": "echo",
        "input_per_million": "0",
        "output_per_million": "0",
        "context_window": "8192",
        "max_output_tokens": "1024",
        "enabled": "on",
        **fields,
    }
    return client.post(_url(ModelPrice, "add"), data)


@pytest.mark.parametrize(
    ("model", "provider", "field", "message"),
    [
        ("echo", "local", "model", "A model of the offline local provider is named “local/<name>”"),
        ("local/gpt", "openai", "provider", "Names starting with “local/” are reserved"),
        ("local/gem", "gemini", "provider", "Names starting with “local/” are reserved"),
    ],
    ids=["local-provider-other-name", "local-name-openai", "local-name-gemini"],
)
def test_model_price_add_refuses_local_provider_and_local_name_apart_on_the_right_field(
    admin_client, model, provider, field, message
):
    response = _price_add(admin_client, model=model, provider=provider)

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == [field]
    assert message in errors[field][0]
    assert escape(message) in response.content.decode()
    assert not ModelPrice.objects.filter(model=model).exists()


def test_model_price_add_saves_local_names_with_local_and_other_names_upstream(admin_client):
    local = _price_add(admin_client, model="local/echo", provider="local")
    upstream = _price_add(
        admin_client, model="gpt-4o-mini", provider="openai", upstream_model="gpt-4o-mini"
    )

    assert local.status_code == upstream.status_code == 302
    saved = dict(ModelPrice.objects.values_list("model", "provider"))
    assert saved == {"local/echo": "local", "gpt-4o-mini": "openai"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_output_tokens": "0"}, "max_output_tokens"),
        ({"context_window": "0"}, "context_window"),
        ({"context_window": "512", "max_output_tokens": "1024"}, "max_output_tokens"),
    ],
    ids=["no-output", "no-context", "output-past-context"],
)
def test_model_price_token_limits_that_no_request_could_meet_are_refused(
    admin_client, fields, field
):
    response = _price_add(admin_client, **fields)

    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not ModelPrice.objects.exists()


def test_model_price_change_to_an_upstream_provider_keeps_a_local_name_local(
    admin_client, local_model
):
    response = _edit(admin_client, ModelPrice, local_model.pk, provider="openai")

    assert response.status_code == 200
    assert "provider" in response.context["adminform"].form.errors
    local_model.refresh_from_db()
    assert local_model.provider == "local"


def test_seed_demo_entry_and_factory_rows_follow_the_local_naming_rule():
    from quotas.management.commands.seed_demo import DEMO_MODEL, DEMO_PRICE
    from quotas.tests.factories import ModelPriceFactory

    ModelPrice(model=DEMO_MODEL, **DEMO_PRICE).full_clean()
    for name in ("local/demo", "other/model"):
        ModelPriceFactory.build(model=name).full_clean()


# --- Catalogue entries that other rows name ---


@pytest.fixture
def named_model(local_model):
    """local/demo as a provider quota, a plan, a key and a revoked key name it."""
    quota = ProviderQuota.objects.create(provider="local", model="local/demo", requests_per_day=5)
    plan = PlanFactory(name="gold", allowed_models=["local/demo"])
    user = UserQuotaFactory(user=UserFactory(username="carol"), plan=plan).user
    _, key = key_create(user=user, name="ci", scopes=["generate", "model:local/demo"])
    _, revoked = key_create(user=user, name="old", scopes=["model:local/demo"])
    revoked.revoked_at = timezone.now()
    revoked.save()
    return {"model": local_model, "quota": quota, "plan": plan, "key": key, "revoked": revoked}


def _references_listed(text: str, named_model: dict[str, Any]) -> None:
    assert "provider quota local:local/demo" in text
    assert "plan “gold”" in text
    assert f"API key tg_{named_model['key'].prefix}" in text
    # A revoked key can never be used again: it holds nothing back.
    assert named_model["revoked"].prefix not in text


def test_catalogue_rename_refused_while_a_provider_quota_plan_key_or_default_names_it(
    admin_client, named_model
):
    model, key = named_model["model"], named_model["key"]

    response = _edit(admin_client, ModelPrice, model.pk, model="local/demo2")

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["model"]
    _references_listed(errors["model"][0], named_model)
    assert "TOLLGATE_DEFAULT_MODEL" in errors["model"][0]
    model.refresh_from_db()
    assert model.model == "local/demo"
    # The provider's limit still holds on the model, and the plan and key still reach it.
    policy = policy_resolve(user_id=key.user_id, key_id=key.pk, model="local/demo")
    assert "p:local:local/demo" in {q.counter for q in policy.quotas}


def test_catalogue_provider_change_refused_while_a_limit_of_its_provider_names_it(
    admin_client, settings
):
    from quotas.tests.factories import ModelPriceFactory

    model = ModelPriceFactory(model="gpt-x", upstream_model="gpt-x")
    row = ProviderQuota.objects.create(provider="openai", model="gpt-x", tokens_per_day=1000)
    PlanFactory(name="gold", allowed_models=["gpt-x"])

    response = _edit(admin_client, ModelPrice, model.pk, provider="gemini")

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["provider"]
    assert "provider quota openai:gpt-x" in errors["provider"][0]
    model.refresh_from_db()
    assert model.provider == "openai"
    # A plan or key names the model only: moved to another provider it still reaches it.
    row.delete()
    moved = _edit(admin_client, ModelPrice, model.pk, provider="gemini")
    assert moved.status_code == 302
    model.refresh_from_db()
    assert model.provider == "gemini"


def test_catalogue_delete_refused_while_named_and_lists_what_names_it(admin_client, named_model):
    model = named_model["model"]

    page = admin_client.get(_url(ModelPrice, "delete", model.pk))
    response = admin_client.post(_url(ModelPrice, "delete", model.pk), {"post": "yes"})

    html = page.content.decode()
    assert page.status_code == 200
    assert "cannot be deleted while" in html
    _references_listed(html, named_model)
    assert 'name="post"' not in html  # no button to confirm
    assert response.status_code == 200
    assert ModelPrice.objects.filter(pk=model.pk).exists()
    assert not AuditEntry.objects.filter(object_type="modelprice", field="(deleted)").exists()


def test_catalogue_bulk_delete_refused_while_any_selected_model_is_named(admin_client, named_model):
    from quotas.tests.factories import ModelPriceFactory

    model, free = named_model["model"], ModelPriceFactory(model="local/free")
    data = {"action": "delete_selected", "_selected_action": [str(model.pk), str(free.pk)]}

    page = admin_client.post(_url(ModelPrice, "changelist"), data)
    response = admin_client.post(_url(ModelPrice, "changelist"), {**data, "post": "yes"})

    html = page.content.decode()
    assert "cannot be deleted while" in html
    _references_listed(html, named_model)
    assert response.status_code == 200
    assert ModelPrice.objects.filter(pk__in=[model.pk, free.pk]).count() == 2


def test_catalogue_model_named_nowhere_is_renamed_audited_and_deleted(
    admin_client, admin_user, redis_conn, django_capture_on_commit_callbacks
):
    from quotas.tests.factories import ModelPriceFactory

    model = ModelPriceFactory(model="local/echo")
    user = UserFactory(username="dave")
    admission_admit(
        user_id=user.pk,
        key_id=None,
        model="local/echo",
        request_id="r1",
        prompt_tokens=1,
        max_tokens=1,
    )

    with django_capture_on_commit_callbacks(execute=True):
        response = _edit(admin_client, ModelPrice, model.pk, model="local/echo2")

    assert response.status_code == 302
    entry = AuditEntry.objects.get(object_type="modelprice", field="model", actor__isnull=False)
    assert (entry.old_value, entry.new_value, entry.actor) == (
        "local/echo",
        "local/echo2",
        admin_user,
    )
    # Every worker serves the new name and refuses the old one from the next request.
    admission_admit(
        user_id=user.pk,
        key_id=None,
        model="local/echo2",
        request_id="r2",
        prompt_tokens=1,
        max_tokens=1,
    )
    with pytest.raises(InvalidRequest):
        admission_admit(
            user_id=user.pk,
            key_id=None,
            model="local/echo",
            request_id="r3",
            prompt_tokens=1,
            max_tokens=1,
        )
    deleted = admin_client.post(_url(ModelPrice, "delete", model.pk), {"post": "yes"})
    assert deleted.status_code == 302
    assert not ModelPrice.objects.filter(pk=model.pk).exists()


def test_provider_quota_moved_to_another_model_is_audited_with_the_actor(
    admin_client, admin_user, local_model
):
    from quotas.tests.factories import ModelPriceFactory

    ModelPriceFactory(model="local/echo")
    row = ProviderQuota.objects.create(provider="local", model="local/demo", requests_per_day=5)

    response = _edit(admin_client, ProviderQuota, row.pk, model="local/echo")

    assert response.status_code == 302
    entry = AuditEntry.objects.get(object_type="providerquota", field="model", actor=admin_user)
    assert (entry.old_value, entry.new_value) == ("local/demo", "local/echo")


def test_catalogue_model_named_elsewhere_can_be_disabled_and_its_names_stay_valid(
    admin_client, named_model
):
    model, plan = named_model["model"], named_model["plan"]

    response = _edit(admin_client, ModelPrice, model.pk, enabled=False)

    assert response.status_code == 302
    model.refresh_from_db()
    assert model.enabled is False
    # The plan that names it can still be edited: its name is still in the catalogue.
    assert _edit(admin_client, Plan, plan.pk, requests_per_minute="7").status_code == 302


# --- Read-only records ---


@pytest.mark.parametrize("model", [UsageRecord, DenialCount, AuditEntry], ids=lambda m: m.__name__)
def test_records_are_read_only_in_the_admin(admin_client, governance, model):
    obj = governance[model]
    before = model.objects.filter(pk=obj.pk).values().get()

    assert admin_client.get(_url(model, "add")).status_code == 403
    view = admin_client.get(_url(model, "change", obj.pk))
    assert view.status_code == 200
    assert 'name="_save"' not in view.content.decode()
    assert admin_client.post(_url(model, "change", obj.pk), {}).status_code == 403
    assert admin_client.post(_url(model, "delete", obj.pk), {"post": "yes"}).status_code == 403
    _action(admin_client, model, "delete_selected", [obj.pk])
    assert model.objects.filter(pk=obj.pk).values().get() == before


def test_daily_roll_up_rows_cannot_be_deleted_in_the_admin(admin_client, governance):
    # The month's budget alerts and the dashboard add up the roll-up's past days, which
    # the periodic roll-up never recomputes: a deleted row would be spend forgotten.
    from quotas.rollups import DailyUsage, usage_rollup

    usage = governance[UsageRecord]
    usage_rollup(day=usage.created_at.date())
    row = DailyUsage.objects.get()

    assert admin_client.get(_url(DailyUsage, "change", row.pk)).status_code == 200
    assert admin_client.post(_url(DailyUsage, "delete", row.pk), {"post": "yes"}).status_code == 403
    _action(admin_client, DailyUsage, "delete_selected", [row.pk])
    assert DailyUsage.objects.filter(pk=row.pk).exists()


def test_ledger_filters_search_and_date_hierarchy(admin_client, governance):
    usage = governance[UsageRecord]
    UsageRecord.objects.create(
        request_id="req-admin-hit",
        user=usage.user,
        model="local/demo",
        provider="local",
        cached=True,
        outcome="cached",
    )

    def listed(**params):
        response = admin_client.get(_url(UsageRecord, "changelist"), params)
        assert response.status_code == 200
        return sorted(r.request_id for r in response.context["cl"].result_list)

    assert listed(cached__exact="1") == ["req-admin-hit"]
    assert listed(outcome__exact="ok") == ["req-admin-1"]
    assert listed(q="req-admin-1") == ["req-admin-1"]
    assert listed(q="req-admin") == ["req-admin-1", "req-admin-hit"]
    assert listed(q="carol") == ["req-admin-1", "req-admin-hit"]
    today = timezone.now()
    assert listed(created_at__year=str(today.year), created_at__month=str(today.month)) == [
        "req-admin-1",
        "req-admin-hit",
    ]
    assert listed(model="local/demo", provider="local") == ["req-admin-1", "req-admin-hit"]


def test_ledger_lists_each_cost_exactly(admin_client, governance):
    usage = governance[UsageRecord]
    UsageRecord.objects.create(
        request_id="req-admin-hit", user=usage.user, model="local/demo", cached=True
    )
    usage.cost_usd = Decimal("0.0000315")  # 90 tokens at 0.15 and 30 at 0.60 a million
    usage.save()
    page = admin_client.get(_url(UsageRecord, "changelist")).content.decode()
    assert ">0.0000315<" in page
    assert ">0.000000<" in page  # the cache hit: six decimals, not twelve


# --- Resetting windows ---


def test_reset_windows_action_lets_a_blocked_user_through_again(
    admin_client, governance, redis_conn
):
    quota = governance[UserQuota]
    Plan.objects.filter(pk=quota.plan_id).update(requests_per_minute=1)

    def admit(request_id):
        return admission_admit(
            user_id=quota.user_id,
            key_id=None,
            model="local/demo",
            request_id=request_id,
            prompt_tokens=1,
            max_tokens=1,
        )

    admit("reset-1")
    with pytest.raises(QuotaExceeded):
        admit("reset-2")

    response = _action(admin_client, UserQuota, "reset_windows", [quota.pk])

    assert response.status_code == 302
    admit("reset-3")
    with pytest.raises(QuotaExceeded):
        admit("reset-4")


def test_reset_windows_action_on_the_user_list(admin_client, governance, redis_conn):
    quota = governance[UserQuota]
    Plan.objects.filter(pk=quota.plan_id).update(requests_per_minute=1)
    admission_admit(
        user_id=quota.user_id,
        key_id=None,
        model="local/demo",
        request_id="u-1",
        prompt_tokens=1,
        max_tokens=1,
    )

    response = admin_client.post(
        reverse("admin:auth_user_changelist"),
        {"action": "reset_user_windows", "_selected_action": [str(quota.user_id)]},
        follow=True,
    )

    assert "Current windows reset for: carol" in response.content.decode()
    admission_admit(
        user_id=quota.user_id,
        key_id=None,
        model="local/demo",
        request_id="u-2",
        prompt_tokens=1,
        max_tokens=1,
    )


def test_suspend_action_suspends_and_records_the_actor(admin_client, admin_user, governance):
    quota = governance[UserQuota]

    _action(admin_client, UserQuota, "suspend", [quota.pk])

    quota.refresh_from_db()
    assert quota.suspended is True
    entry = AuditEntry.objects.get(object_type="userquota", field="suspended")
    assert entry.actor == admin_user


# --- Permissions of staff users ---


def _staff_client(client, *codenames: str):
    from django.contrib.auth.models import Permission

    staff = UserFactory(username="viewer", is_staff=True)
    staff.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client.force_login(staff)
    return client


@pytest.mark.parametrize(
    ("model", "action", "codename"),
    [
        (ApiKey, "revoke", "view_apikey"),
        (ApiKey, "extend_expiry", "view_apikey"),
        (UserQuota, "suspend", "view_userquota"),
        (UserQuota, "reset_windows", "view_userquota"),
    ],
)
def test_view_only_staff_is_offered_no_writing_action_and_cannot_post_one(
    client, governance, model, action, codename
):
    obj = governance[model]
    ApiKey.objects.filter(pk=governance[ApiKey].pk).update(
        expires_at=timezone.now() + dt.timedelta(days=5)
    )
    before = model.objects.filter(pk=obj.pk).values().get()
    staff = _staff_client(client, codename)

    listing = staff.get(_url(model, "changelist"))
    assert listing.status_code == 200
    assert f'value="{action}"' not in listing.content.decode()
    assert _action(staff, model, action, [obj.pk]).status_code in (200, 302)
    assert model.objects.filter(pk=obj.pk).values().get() == before
    assert not LogEntry.objects.filter(user__username="viewer").exists()
    assert not AuditEntry.objects.filter(actor__username="viewer").exists()


def test_view_only_staff_is_offered_no_reset_on_the_user_list(client, governance):
    staff = _staff_client(client, "view_user")
    user = governance[UserQuota].user

    listing = staff.get(reverse("admin:auth_user_changelist"))
    assert listing.status_code == 200
    assert 'value="reset_user_windows"' not in listing.content.decode()
    staff.post(
        reverse("admin:auth_user_changelist"),
        {"action": "reset_user_windows", "_selected_action": [str(user.pk)]},
    )
    assert not LogEntry.objects.filter(user__username="viewer").exists()


def test_staff_with_change_permission_may_revoke_a_key(client, governance):
    staff = _staff_client(client, "view_apikey", "change_apikey")
    key = governance[ApiKey]

    assert 'value="revoke"' in staff.get(_url(ApiKey, "changelist")).content.decode()
    _action(staff, ApiKey, "revoke", [key.pk])

    key.refresh_from_db()
    assert key.revoked_at is not None


def _ledger_rows(user, count: int, start: int = 0) -> None:
    # Spread over three days in two months, as a real ledger's rows are over its span.
    days = [dt.datetime(2026, 2, 27, 12, tzinfo=dt.UTC), dt.datetime(2026, 3, 2, tzinfo=dt.UTC)]
    days.append(days[1] + dt.timedelta(days=3))
    UsageRecord.objects.bulk_create(
        UsageRecord(
            request_id=f"req-span-{i}",
            user=user,
            model="local/demo",
            provider="local",
            created_at=days[i % 3] + dt.timedelta(minutes=i),
        )
        for i in range(start, start + count)
    )


def test_ledger_list_queries_do_not_grow_with_rows_nor_scan_for_distinct_values(
    admin_client, user, local_model
):
    url = _url(UsageRecord, "changelist")
    _ledger_rows(user, 5)
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(url).status_code == 200
    _ledger_rows(user, 45, start=5)
    with CaptureQueriesContext(connection) as many:
        page = admin_client.get(url)

    assert len(many.captured_queries) == len(few.captured_queries)
    assert not [q["sql"] for q in many.captured_queries if "DISTINCT" in q["sql"]]
    content = page.content.decode()
    assert "created_at__month=2" in content
    assert "created_at__month=3" in content
    filters = {spec.title: spec for spec in page.context_data["cl"].filter_specs}
    assert [v for v, _ in filters["model"].lookup_choices] == ["local/demo"]
    assert "openai" in [v for v, _ in filters["provider"].lookup_choices]


def test_ledger_list_queries_do_not_grow_with_rows_of_unnamed_keys(admin_client, user):
    # A key made without --name shows as "tg_<prefix> (<its user>)": its user comes with
    # the page's one query, not one query per row.
    url = _url(UsageRecord, "changelist")
    keys = [key_create(user=user, name="")[1] for _ in range(2)]

    def rows(start: int, count: int) -> None:
        UsageRecord.objects.bulk_create(
            UsageRecord(
                request_id=f"req-key-{i}",
                user=user,
                api_key=keys[i % 2],
                model="local/demo",
                provider="local",
            )
            for i in range(start, start + count)
        )

    rows(0, 2)
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(url).status_code == 200
    rows(2, 20)
    with CaptureQueriesContext(connection) as many:
        page = admin_client.get(url)

    assert len(many.captured_queries) == len(few.captured_queries)
    assert page.content.decode().count(f"{keys[0].display} ({user.username})") == 11


def test_ledger_date_hierarchy_lists_the_days_that_have_rows(admin_client, user):
    _ledger_rows(user, 6)
    url = _url(UsageRecord, "changelist")

    march = admin_client.get(url, {"created_at__year": "2026", "created_at__month": "3"})
    assert march.status_code == 200
    content = march.content.decode()
    assert "created_at__day=2" in content
    assert "created_at__day=5" in content
    assert "created_at__day=3" not in content
    assert len(march.context_data["cl"].result_list) == 4
    years = admin_client.get(url, {"created_at__year": "2026"}).content.decode()
    assert years.count("created_at__month=") == 2
    searched = admin_client.get(
        url, {"created_at__year": "2026", "created_at__month": "2", "q": "req-span-0"}
    )
    assert [r.request_id for r in searched.context_data["cl"].result_list] == ["req-span-0"]
    assert "created_at__day=27" in searched.content.decode()


def test_the_default_plan_keeps_its_name_and_cannot_be_deleted(admin_client, settings):
    # Users without a quota row of their own are on the plan QUOTA_DEFAULT_PLAN names:
    # renamed or deleted, it would leave them without plan limits, unnoticed.
    settings.QUOTA_DEFAULT_PLAN = "free"
    default, other = PlanFactory(name="free", requests_per_minute=5), PlanFactory(name="gold")

    renamed = _edit(admin_client, Plan, default.pk, name="starter")
    page = admin_client.get(_url(Plan, "delete", default.pk))
    deleted = admin_client.post(_url(Plan, "delete", default.pk), {"post": "yes"})
    bulk = admin_client.post(
        _url(Plan, "changelist"),
        {"action": "delete_selected", "_selected_action": [str(default.pk)], "post": "yes"},
    )

    assert renamed.status_code == 200
    assert "QUOTA_DEFAULT_PLAN" in renamed.context["adminform"].form.errors["name"][0]
    assert "QUOTA_DEFAULT_PLAN" in page.content.decode()
    assert 'name="post"' not in page.content.decode()  # no button to confirm
    assert (deleted.status_code, bulk.status_code) == (200, 200)
    assert Plan.objects.filter(pk=default.pk, name="free").exists()
    # Any other plan is renamed as before.
    assert _edit(admin_client, Plan, other.pk, name="platinum").status_code == 302
    assert Plan.objects.filter(pk=other.pk, name="platinum").exists()


def test_ledger_list_counts_and_pages_only_the_latest_rows(admin_client, user):
    # The paginator counted the whole ledger at each visit (a scan of millions of rows) and
    # linked its last page, whose OFFSET walked all of them: past DATABASE_READ_TIMEOUT_MS
    # at two million rows (docs/BENCHMARKS.md). Only the latest 10,000 are counted and
    # paged; older ones are reached through the dates, filters or search.
    LEDGER_LIST_MAX_ROWS = 10_000  # noqa: N806

    start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    UsageRecord.objects.bulk_create(
        (
            UsageRecord(
                request_id=f"req-many-{i}",
                user=user,
                model="local/demo",
                provider="local",
                created_at=start + dt.timedelta(seconds=i),
            )
            for i in range(LEDGER_LIST_MAX_ROWS + 50)
        ),
        batch_size=5000,
    )
    url = _url(UsageRecord, "changelist")
    with CaptureQueriesContext(connection) as queries:
        first = admin_client.get(url)

    assert first.status_code == 200
    cl = first.context_data["cl"]
    assert cl.result_count == LEDGER_LIST_MAX_ROWS
    assert f"{LEDGER_LIST_MAX_ROWS}+ usage records" in first.content.decode()
    assert cl.result_list[0].request_id == f"req-many-{LEDGER_LIST_MAX_ROWS + 49}"
    (count,) = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"]]
    assert f"LIMIT {LEDGER_LIST_MAX_ROWS + 1}" in count

    pages = LEDGER_LIST_MAX_ROWS // cl.list_per_page
    last = admin_client.get(url, {"p": pages})
    assert last.status_code == 200
    assert (
        last.context_data["cl"].result_list[0].request_id == f"req-many-{50 + cl.list_per_page - 1}"
    )
    with CaptureQueriesContext(connection) as queries:
        past = admin_client.get(url, {"p": pages + 1})
    assert past.status_code == 302  # Django's "?e=1": no such page
    assert not [q["sql"] for q in queries.captured_queries if "OFFSET" in q["sql"]]
    searched = admin_client.get(url, {"q": "req-many-1"})
    assert f"{LEDGER_LIST_MAX_ROWS}+ results" not in searched.content.decode()  # 1,161 of them
    assert "1161 results" in searched.content.decode()
    searched = admin_client.get(url, {"q": "req-many-"})
    assert f"{LEDGER_LIST_MAX_ROWS}+ results" in searched.content.decode()


@pytest.mark.parametrize("column", [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
def test_ledger_list_sorts_only_by_columns_an_index_serves(admin_client, user, column):
    # A sort by cost, tokens, user, key... read and joined every row of the ledger before
    # keeping 100 (2.1-2.4 s at two million rows, linear in the ledger): such an `o=` is
    # ignored, and only the request id and the time are offered as sortable headers.
    _ledger_rows(user, 6)
    url = _url(UsageRecord, "changelist")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(url, {"o": str(column)})

    assert page.status_code == 200
    (listed,) = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith('SELECT "quotas_usagerecord"."id"') and "ORDER BY" in q["sql"]
    ]
    assert listed.endswith(
        'ORDER BY "quotas_usagerecord"."created_at" DESC, "quotas_usagerecord"."id" DESC'
    ), listed[-200:]
    rows = [r.created_at for r in page.context_data["cl"].result_list]
    assert rows == sorted(rows, reverse=True)
    assert page.context_data["cl"].sortable_by == ("request_id", "created_at")


@pytest.mark.parametrize("order", ["0", "-0", "1", "-1"])
def test_ledger_list_sorted_by_request_id_or_time_reads_an_index(rf, admin_user, user, order):
    from django.contrib import admin as django_admin

    _ledger_rows(user, 6)
    request = rf.get(_url(UsageRecord, "changelist"), {"o": order})
    request.user = admin_user
    cl = django_admin.site.get_model_admin(UsageRecord).get_changelist_instance(request)
    with connection.cursor() as cursor:
        # A table of six rows is read whole whatever the indexes: make that the last resort,
        # so that the plan shows whether the ordering has an index to walk.
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = cl.queryset[: cl.list_per_page].explain()

    assert "Seq Scan on quotas_usagerecord" not in plan, plan


@pytest.mark.parametrize(
    "params",
    [
        {"outcome__exact": "upstream_error"},
        {"outcome__exact": "abandoned"},
        {"fallback__exact": "1"},
    ],
)
def test_ledger_list_of_unusual_rows_reads_their_index(rf, admin_user, user, params):
    # Failed, abandoned and stale-fallback rows are a percent of the ledger or less: without
    # an index of their own, counting them read the whole ledger (0.2-0.3 s at two million
    # rows, linear), and a page of them walked the time index past every ordinary row.
    from django.contrib import admin as django_admin

    _ledger_rows(user, 6)
    request = rf.get(_url(UsageRecord, "changelist"), params)
    request.user = admin_user
    cl = django_admin.site.get_model_admin(UsageRecord).get_changelist_instance(request)
    with connection.cursor() as cursor:
        # The planner knows how rare such rows are, as autovacuum's statistics tell it of a
        # real ledger; and a table of six rows is read whole whatever the indexes: make that
        # the last resort.
        cursor.execute("ANALYZE quotas_usagerecord")
        cursor.execute("SET LOCAL enable_seqscan = off")
        counted = cl.queryset.order_by()[:10_001].explain()
        listed = cl.queryset[: cl.list_per_page].explain()

    assert "usage_unusual" in counted, counted
    assert "usage_unusual" in listed, listed

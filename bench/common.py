"""Helpers shared by the benchmarks."""

from __future__ import annotations

from typing import Any


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database named at the end of `url` unless it exists."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


LOCAL_MODEL = {
    "provider": "local",
    "upstream_model": "demo",
    "input_per_million": "1.5",
    "output_per_million": "2",
    "enabled": True,
}
BIG = 10**9


def unlimited_principal(*, username: str, plan: str, model: str, model_fields: dict) -> Any:
    """Migrate; the catalogue entry `model`; a plan named `plan` with every limit set, far
    above what a benchmark sends, so that every window is checked and reserved; the global
    limits likewise; and the user `username` on that plan. Django must be set up. Returns
    the user."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from quotas.models import GlobalLimits, ModelPrice, Plan, UserQuota

    call_command("migrate", verbosity=0)
    ModelPrice.objects.update_or_create(model=model, defaults=model_fields)
    limits, _ = Plan.objects.update_or_create(
        name=plan,
        defaults={
            "requests_per_minute": BIG,
            "requests_per_hour": BIG,
            "requests_per_day": BIG,
            "tokens_per_minute": BIG * 1000,
            "tokens_per_day": BIG * 1000,
            "cost_per_day": "1000000",
            "cost_per_month": "1000000",
            "concurrency": 10_000,
        },
    )
    GlobalLimits.objects.update_or_create(
        pk=1, defaults={"requests_per_hour": BIG, "cost_per_day": "1000000", "concurrency": 10_000}
    )
    user, _ = get_user_model().objects.get_or_create(username=username)
    UserQuota.objects.update_or_create(user=user, defaults={"plan": limits})
    return user

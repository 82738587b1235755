"""seed_demo: the plans, user, model and key for a first look; safe to run again.

Creates (when missing, never overwriting an operator's edits) the default plan "free", the
plan "demo", the user "demo" on that plan and the catalogue entry `local/demo` served by the
offline provider; then prints a new demo key and a curl line that uses it.
"""

from __future__ import annotations

import json
import shlex
from argparse import ArgumentParser
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

from quotas.management.base import TollgateCommand
from quotas.models import ModelPrice, Plan, Provider, UserQuota
from quotas.services import key_create

DEMO_USER = "demo"
DEMO_MODEL = "local/demo"
PLANS: dict[str, dict[str, Any]] = {
    "free": {
        "description": "The default plan of users without a quota of their own.",
        "requests_per_minute": 20,
        "requests_per_hour": 300,
        "requests_per_day": 1000,
        "tokens_per_minute": 20_000,
        "tokens_per_day": 200_000,
        "cost_per_day": Decimal("1.00"),
        "cost_per_month": Decimal("10.00"),
        "concurrency": 2,
    },
    "demo": {
        "description": "For a first look (seed_demo).",
        "requests_per_minute": 60,
        "requests_per_hour": 1000,
        "requests_per_day": 5000,
        "tokens_per_minute": 100_000,
        "tokens_per_day": 1_000_000,
        "cost_per_day": Decimal("5.00"),
        "cost_per_month": Decimal("50.00"),
        "concurrency": 4,
    },
}
DEMO_PRICE: dict[str, Any] = {
    "provider": Provider.LOCAL,
    "upstream_model": "demo",
    "input_per_million": Decimal("0.50"),
    "output_per_million": Decimal("1.50"),
    "context_window": 8192,
    "max_output_tokens": 1024,
    "enabled": True,
}


class Command(TollgateCommand):
    help = "Create the demo plan, user and model if missing, and print a new demo API key."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="Where the service listens, for the curl line.",
        )

    def _report(self, what: str, created: bool) -> None:
        self.stdout.write(f"{what}: {'created' if created else 'already there, left as it is'}")

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            for name, limits in PLANS.items():
                plan, created = Plan.objects.get_or_create(name=name, defaults=limits)
                self._report(f"plan {plan.name!r}", created)
            if settings.QUOTA_DEFAULT_PLAN not in PLANS:
                self.stdout.write(
                    self.style.WARNING(
                        f"QUOTA_DEFAULT_PLAN is {settings.QUOTA_DEFAULT_PLAN!r}, "
                        "not a plan this command creates."
                    )
                )
            price, created = ModelPrice.objects.get_or_create(model=DEMO_MODEL, defaults=DEMO_PRICE)
            self._report(f"model {price.model!r}", created)

            user_model = get_user_model()
            user, created = user_model._default_manager.get_or_create(
                **{user_model.USERNAME_FIELD: DEMO_USER},
                defaults={"email": "demo@example.com"},
            )
            if created:
                user.set_unusable_password()
                user.save(update_fields=["password"])
            self._report(f"user {DEMO_USER!r}", created)
            quota, created = UserQuota.objects.get_or_create(
                user=user, defaults={"plan": Plan.objects.get(name="demo")}
            )
            self._report(f"quota of {DEMO_USER!r} (plan {quota.plan})", created)
            full_key, key = key_create(user=user, name="demo (seed_demo)")

        if not user.is_active:
            self.stdout.write(self.style.WARNING(f"user {DEMO_USER!r} is inactive: keys refused."))
        if not price.enabled:
            self.stdout.write(self.style.WARNING(f"model {DEMO_MODEL!r} is disabled."))
        body = json.dumps({"prompt": "Hello, Tollgate!", "model": DEMO_MODEL})
        url = options["base_url"].rstrip("/") + "/api/v1/generate"
        self.stdout.write("")
        self.stdout.write(f"Demo API key {key.display} (shown once, not stored):")
        self.stdout.write(f"  {full_key}")
        self.stdout.write("Try it:")
        self.stdout.write(
            f"  curl -sS -X POST {shlex.quote(url)} "
            f"-H {shlex.quote('Authorization: Bearer ' + full_key)} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
        )

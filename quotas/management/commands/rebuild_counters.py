"""`manage.py rebuild_counters`: restore Redis day/month counters from the ledger."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from quotas import services
from quotas.engine import BackendUnavailable


class Command(BaseCommand):
    help = (
        "Rebuild the day and month quota counters from the usage ledger. Counters are "
        "recreated lazily, from the ledger, at the next admission of each principal."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError(
                "REDIS_URL is not set: the counters live in the server's own process, which "
                "builds them from the ledger itself; this command cannot reach them."
            )
        try:
            services.counters_rebuild_all()
        except BackendUnavailable as exc:
            raise CommandError(f"the quota backend is unreachable: {exc}") from exc
        self.stdout.write(
            self.style.SUCCESS(
                "Counter epoch rotated: every day and month counter is rebuilt from the "
                "ledger before its next use."
            )
        )

"""What the quotas commands share: finding a user, parsing a day, the output format."""

from __future__ import annotations

import datetime as dt
from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

OUTPUT_FORMATS = ("table", "csv", "json")


class TollgateCommand(BaseCommand):
    """Base of the quotas commands: bad input is a CommandError, never a traceback."""

    def add_user_argument(self, parser: ArgumentParser) -> None:
        parser.add_argument("username", help="The user, by username.")

    def add_format_argument(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--format", choices=OUTPUT_FORMATS, default="table", help="Output format."
        )

    def get_user(self, username: str) -> Any:
        """The user with this username, or CommandError."""
        user_model = get_user_model()
        try:
            return user_model._default_manager.get_by_natural_key(username)
        except user_model.DoesNotExist as exc:
            raise CommandError(f"No user named {username!r}.") from exc

    def parse_day(self, value: str | None) -> dt.date:
        """A YYYY-MM-DD day (None: today in UTC), or CommandError."""
        if value is None:
            return dt.datetime.now(dt.UTC).date()
        try:
            return dt.date.fromisoformat(value)
        except ValueError as exc:
            raise CommandError(f"Not a date (YYYY-MM-DD): {value!r}.") from exc

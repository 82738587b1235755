"""create_api_key USERNAME [--name N] [--scopes a,b] [--expires-in-days D]

Prints the new key on stdout, alone on its line, so that a script can capture it; it is
shown this once and never stored.
"""

from __future__ import annotations

import datetime as dt
from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from quotas.forms import NameListField, scopes_validate
from quotas.management.base import TollgateCommand
from quotas.models import ApiKey
from quotas.services import key_create

MAX_EXPIRY_DAYS = 3650


class Command(TollgateCommand):
    help = "Create an API key for a user and print it (once)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        self.add_user_argument(parser)
        parser.add_argument("--name", default="", help="A label for the key.")
        parser.add_argument(
            "--scopes", default="", help="Comma-separated scopes (default: every scope)."
        )
        parser.add_argument(
            "--expires-in-days",
            type=int,
            default=None,
            dest="expires_in_days",
            help=f"Expire the key after this many days (1..{MAX_EXPIRY_DAYS}; default: never).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user = self.get_user(options["username"])
        if not user.is_active:
            raise CommandError(
                f"User {user.get_username()!r} is inactive; its keys would be refused."
            )
        name: str = options["name"]
        max_name = ApiKey._meta.get_field("name").max_length or 100
        if len(name) > max_name:
            raise CommandError(f"--name is at most {max_name} characters.")
        try:
            scopes = scopes_validate(NameListField().to_python(options["scopes"]))
        except ValidationError as exc:
            raise CommandError(f"--scopes: {' '.join(exc.messages)}") from exc
        expires_at = None
        days = options["expires_in_days"]
        if days is not None:
            if not 1 <= days <= MAX_EXPIRY_DAYS:
                raise CommandError(f"--expires-in-days must be between 1 and {MAX_EXPIRY_DAYS}.")
            expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(days=days)

        full_key, key = key_create(user=user, name=name, scopes=scopes, expires_at=expires_at)
        self.stderr.write(
            f"Created {key.display} for {user.get_username()}"
            f"{f' ({name})' if name else ''}, scopes: {', '.join(scopes) or 'all'}, "
            f"expires: {key.expires_at.isoformat() if key.expires_at else 'never'}. "
            "Copy the key now: it is not stored and cannot be shown again.",
            style_func=self.style.WARNING,
        )
        self.stdout.write(full_key)

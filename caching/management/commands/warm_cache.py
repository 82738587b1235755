"""manage.py warm_cache [--top N] [--topics-file F]: pre-compute topic answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from caching.errors import CacheUnavailable, WarmUserMissing
from caching.services import cache_shared_check, popularity_top, topic_normalise
from caching.warming import DEFAULT_COUNT, cache_warm, warm_user_get
from config.errors import ApiError
from quotas.services import policy_get


class Command(BaseCommand):
    help = (
        "Pre-compute the subtopics of the N most requested topics (--top) and/or of the "
        "topics listed one per line in a file (--topics-file), with a progress bar."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--top", type=int, default=None, help="the N most popular topics")
        parser.add_argument("--topics-file", default=None, help="one topic per line; # comments")
        parser.add_argument("--user", default=None, help="username charged (CACHE_WARM_USER)")
        parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="subtopics (3..12)")
        parser.add_argument("--model", default=None, help="model (TOLLGATE_DEFAULT_MODEL)")
        parser.add_argument(
            "--refresh", action="store_true", help="recompute answers that are already cached"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError(
                "REDIS_URL is not set: each process has a cache of its own, so the server "
                "would see nothing this command computes (and its calls would still be "
                "charged)."
            )
        top, path = options["top"], options["topics_file"]
        if top is None and path is None:
            raise CommandError("Give --top N and/or --topics-file F.")
        if top is not None and top < 1:
            raise CommandError("--top must be at least 1.")
        if not 3 <= options["count"] <= 12:
            raise CommandError("--count must be between 3 and 12.")
        # A Redis that does not take answers would leave them in this command's memory,
        # which it loses as it exits, and their provider calls charged all the same.
        try:
            cache_shared_check()
        except CacheUnavailable as exc:
            raise CommandError(f"{exc.message} Nothing was warmed.") from exc
        topics: list[str] = []
        if path is not None:
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"Cannot read {path}: {exc}") from exc
            topics += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        if top is not None:
            topics += [topic for topic, _ in popularity_top(limit=top)]
        try:
            user_id = warm_user_get(username=options["user"])
        except WarmUserMissing as exc:
            raise CommandError(exc.message) from exc
        # A model unknown, disabled or not allowed to the account (or the account
        # suspended) would refuse every topic alike: a bad argument, said before any topic.
        model = options["model"] or settings.TOLLGATE_DEFAULT_MODEL
        try:
            policy_get(user_id=user_id, key_id=None, model=model)
        except ApiError as exc:
            raise CommandError(f"Cannot warm with model {model!r}: {exc.message}") from exc
        unique = list(dict.fromkeys(filter(None, map(topic_normalise, topics))))
        stream = getattr(self.stderr, "_out", self.stderr)  # tqdm needs the raw stream
        with tqdm(total=len(unique), unit="topic", file=stream) as bar:
            report = cache_warm(
                topics=unique,
                user_id=user_id,
                count=options["count"],
                model=options["model"],
                refresh=options["refresh"],
                on_progress=lambda topic: bar.update(1),
            )
        self.stdout.write(
            f"warmed {len(report.warmed)}, already cached {len(report.cached)}, "
            f"failed {len(report.failed)}"
        )
        for topic, code in report.failed.items():
            self.stderr.write(f"  {topic}: {code}")
        if report.failed:
            # A scheduled run that left topics cold is a failed run, for cron or a Job.
            raise CommandError(f"{len(report.failed)} of {len(unique)} topics could not be warmed.")

"""Warming: pre-computing topic answers so that the first real request is a cache hit.

Answers are generated through generation.services.topic_subtopics, exactly as a client's
POST /api/v1/topics/subtopics would be: admitted, charged to an operator's account
(CACHE_WARM_USER, at priority "low" so that warming yields to interactive traffic), cached
under the same key. Warming an answer that is already cached does nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth import get_user_model

from caching.errors import WarmUserMissing
from caching.services import (
    cache_fresh_for,
    cache_get,
    popularity_bump,
    popularity_decay,
    popularity_top,
    topic_normalise,
)

logger = logging.getLogger("tollgate.caching")

DEFAULT_COUNT = 6  # the subtopics endpoint's default `count`
WARM_PRIORITY = "low"


@dataclass
class WarmReport:
    """What a warming run did: answers computed, already cached, failed (topic -> code)."""

    warmed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def warm_user_get(*, username: str | None = None) -> int:
    """The id of the account that pays for warming: `username`, else CACHE_WARM_USER,
    else the first active superuser. Raises WarmUserMissing if there is none."""
    users = get_user_model().objects.filter(is_active=True)
    name = username or settings.CACHE_WARM_USER
    user = (
        users.filter(username=name).first()
        if name
        else users.filter(is_superuser=True).order_by("pk").first()
    )
    if user is None:
        raise WarmUserMissing(
            f"No active user {name!r} to charge warming to."
            if name
            else "No active superuser to charge warming to; set CACHE_WARM_USER."
        )
    return int(user.pk)


def topic_key(*, topic: str, count: int = DEFAULT_COUNT, model: str | None = None) -> str:
    """The cache key of a topic's subtopics, as the subtopics endpoint stores it."""
    from generation.services import subtopics_cache_key

    model = model or settings.TOLLGATE_DEFAULT_MODEL
    return subtopics_cache_key(topic=topic, count=count, model=model)


def cache_warm(
    *,
    topics: Iterable[str],
    user_id: int,
    count: int = DEFAULT_COUNT,
    model: str | None = None,
    refresh: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> WarmReport:
    """Make sure each topic's subtopics are cached (deduplicated by normalised topic).

    `refresh=True` recomputes answers that are still cached; each is served as it is
    (fresh, then stale for the quota fallback) until the new one is stored, and for good if
    none is computed. A topic that fails (quota, upstream) is reported, not raised.
    `on_progress(topic)` is called after each topic.
    """
    from generation.services import Caller, topic_subtopics

    model = model or settings.TOLLGATE_DEFAULT_MODEL
    report = WarmReport()
    seen: set[str] = set()
    for raw_topic in topics:
        topic = topic_normalise(raw_topic)
        if not topic or topic in seen:
            continue
        seen.add(topic)
        key = topic_key(topic=topic, count=count, model=model)
        if not refresh and cache_get(key) is not None:
            report.cached.append(topic)
            if on_progress:
                on_progress(topic)
            continue
        caller = Caller(user_id, None, f"warm-{uuid.uuid4().hex}", WARM_PRIORITY)
        try:
            # A refresh skips the look-up and replaces the answer once it has a new one:
            # until then (or if it gets none) clients are served the answer they had.
            outcome = topic_subtopics(
                caller=caller,
                topic=topic,
                count=count,
                model=model,
                cache_policy="refresh" if refresh else "use",
            )
        except Exception as exc:  # one topic failing must not stop the others
            code = getattr(exc, "code", type(exc).__name__)
            logger.warning("warming %r failed: %s", topic, code)
            report.failed[topic] = str(code)
        else:
            if outcome.fallback:
                # Refused (a quota) or not answered (the provider), the request got the
                # stored copy as a client would: nothing new was computed or stored.
                code = outcome.fallback_code or "fallback"
                logger.warning("warming %r failed: %s (the stored copy was kept)", topic, code)
                report.failed[topic] = code
            elif not _shared(key):
                # Redis went away meanwhile: the answer reached this process's memory
                # alone, which no server reads (and which a command loses as it exits).
                logger.warning("warming %r failed: Redis did not take the answer", topic)
                report.failed[topic] = "redis_unavailable"
            else:
                report.warmed.append(topic)
        finally:
            # The endpoint's service counts every call as a client request; warming is not.
            popularity_bump(topic, count=-1)
        if on_progress:
            on_progress(topic)
    return report


def _shared(key: str) -> bool:
    """Whether the answer of `key` is where every server finds it: in Redis, or, without
    REDIS_URL (the embedded default, where a task runs in the server), in this process."""
    if not settings.REDIS_URL:
        return True
    try:
        return cache_fresh_for(key) is not None
    except Exception:  # Redis did not answer the read either
        return False


def popular_refresh(
    *,
    user_id: int,
    threshold: int | None = None,
    limit: int = 100,
    interval_seconds: float = 3600,
    decay: float = 0.5,
) -> WarmReport:
    """Keep popular topics warm: every topic with at least `threshold` requests (default
    CACHE_POPULAR_THRESHOLD) whose answer is missing or stays fresh for less than
    `interval_seconds` (the refresh period) is recomputed. Popularity is then multiplied by
    `decay`, so that a topic nobody asks for any more stops being refreshed."""
    threshold = settings.CACHE_POPULAR_THRESHOLD if threshold is None else threshold
    report = WarmReport()
    due: list[str] = []
    for topic, _ in popularity_top(limit=limit, min_count=threshold):
        fresh_for = cache_fresh_for(topic_key(topic=topic))
        if fresh_for is not None and fresh_for >= interval_seconds:
            report.cached.append(topic)
        else:
            due.append(topic)
    done = cache_warm(topics=due, user_id=user_id, refresh=True)
    report.warmed, report.failed = done.warmed, done.failed
    if decay < 1:
        popularity_decay(factor=decay)
    return report

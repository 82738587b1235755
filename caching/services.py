"""The cache tier's public interface (used by generation). A first, simple implementation
over Django's default cache; the memory layer, single flight, versioned namespaces and the
stale copies are being built behind this same interface."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class CacheHit:
    value: dict[str, Any]
    layer: str  # "memory" | "redis"
    stale: bool = False


def topic_normalise(topic: str) -> str:
    """Case- and whitespace-insensitive form of a topic."""
    return _SPACES.sub(" ", topic).strip().lower()


def cache_key_generation(*, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """Key of a generation request: a hash of everything that changes the answer."""
    canonical = json.dumps(
        {"model": model, "messages": messages, "params": params}, sort_keys=True,
        separators=(",", ":"), ensure_ascii=False,
    )
    return "gen:" + hashlib.sha256(canonical.encode()).hexdigest()


def cache_key_topic(*, kind: str, topic: str, model: str, extra: str = "") -> str:
    """Key of a topic answer: `topic:<normalised topic>:<kind>:<hash of model and extra>`,
    so that `topic:python*` invalidates every answer about topics starting with python."""
    digest = hashlib.sha256(f"{model}\x00{extra}".encode()).hexdigest()[:16]
    return f"topic:{topic_normalise(topic)}:{kind}:{digest}"


def cache_get(key: str) -> CacheHit | None:
    value = cache.get(key)
    return CacheHit(value=value, layer="redis") if value is not None else None


def cache_get_stale(key: str) -> CacheHit | None:
    value = cache.get(f"stale:{key}")
    return CacheHit(value=value, layer="redis", stale=True) if value is not None else None


def cache_set(key: str, value: dict[str, Any], *, ttl: int | None = None) -> None:
    cache.set(key, value, ttl or settings.CACHE_REDIS_TTL)
    cache.set(f"stale:{key}", value, (ttl or settings.CACHE_REDIS_TTL) + settings.QUOTA_FALLBACK_CACHE_TTL)


def single_flight(
    key: str, compute: Callable[[], dict[str, Any]], *, wait_seconds: float = 30.0
) -> tuple[dict[str, Any], bool]:
    """Run `compute` once for concurrent identical misses: (value, computed_here)."""
    return compute(), True


def popularity_bump(topic: str) -> None:
    """Count one request for a topic."""

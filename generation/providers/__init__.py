"""Provider registry: one client per provider per process (connection pools are reused)."""

from __future__ import annotations

import threading

from django.conf import settings

from generation.providers.base import Provider

_providers: dict[str, Provider] = {}
_lock = threading.Lock()


def provider_get(name: str) -> Provider:
    """The provider named by a catalogue row (`local`, `openai`, `gemini`)."""
    provider = _providers.get(name)
    if provider is not None:
        return provider
    with _lock:
        provider = _providers.get(name)
        if provider is None:
            provider = _build(name)
            _providers[name] = provider
    return provider


def providers_warm() -> list[str]:
    """Build now the client of every provider the catalogue's enabled models use (which
    imports its SDK), so that a worker starts with them rather than building them on its
    first request. Providers no enabled model uses are not loaded: an SDK costs a worker
    15-30 MiB. Returns their names."""
    from quotas.services import catalogue_providers

    names = catalogue_providers()
    for name in names:
        provider_get(name)
    return names


def providers_reset() -> None:
    """Forget the clients (after the base URLs or keys changed in settings)."""
    with _lock:
        _providers.clear()


def _build(name: str) -> Provider:
    if name == "local":
        from generation.providers.local import LocalProvider

        return LocalProvider()
    if name == "openai":
        from generation.providers.openai_compat import OpenAIProvider

        return OpenAIProvider(
            api_key=settings.OPENAI_API_KEY,
            base_url=settings.OPENAI_BASE_URL,
            connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT,
            max_tokens_param=settings.OPENAI_MAX_TOKENS_PARAM,
        )
    if name == "gemini":
        from generation.providers.gemini import GeminiProvider

        return GeminiProvider(api_key=settings.GEMINI_API_KEY, base_url=settings.GEMINI_BASE_URL)
    raise ValueError(f"unknown provider {name!r}")

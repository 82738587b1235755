"""DRF authentication: API keys (Bearer or X-API-Key), DRF tokens, sessions.

Keys are looked up by prefix in a per-process cache that lives at most one second, then
compared in constant time against the stored hash. A revoked key is therefore refused
within a second on every worker even on endpoints that do not reach admission; admission
itself re-validates the key against the live policy version at no extra round trip.
Failed authentications, a bad API key or a bad DRF token alike, are counted per client
address against one throttle (quotas.auth_throttle); past AUTH_FAILURES_PER_MINUTE the
address's bad credentials get 429 `too_many_authentication_failures`.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeAlias

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import InterfaceError, OperationalError
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from config.outages import Outage
from quotas import keys
from quotas.errors import KeyExpired, KeyRevoked, TooManyAuthFailures, UserInactive
from quotas.models import ApiKey

_CACHE_TTL = 1.0
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
logger = logging.getLogger("tollgate.quotas")


@dataclass(frozen=True, slots=True)
class KeyPrincipal:
    """What a request authenticated by an API key carries as `request.auth`."""

    id: int
    prefix: str
    user_id: int
    scopes: tuple[str, ...]

    @property
    def display(self) -> str:
        return f"tg_{self.prefix}"

    def has_scope(self, scope: str) -> bool:
        return not self.scopes or scope in self.scopes


@dataclass(frozen=True, slots=True)
class _CachedKey:
    key: ApiKey
    user: Any
    fetched_at: float


_key_cache: dict[str, _CachedKey] = {}
_key_lock = threading.Lock()


def key_cache_clear() -> None:
    with _key_lock:
        _key_cache.clear()


def _load_key(prefix: str) -> _CachedKey | None:
    now = time.monotonic()
    cached = _key_cache.get(prefix)
    if cached is not None and now - cached.fetched_at < _CACHE_TTL:
        return cached
    graced = cached is not None and now - cached.fetched_at < settings.AUTH_DB_OUTAGE_GRACE_SECONDS
    if graced and _outage.away():
        return cached
    try:
        key = ApiKey.objects.select_related("user").filter(prefix=prefix).first()
    except (OperationalError, InterfaceError):
        # PostgreSQL unreachable: a key this worker read from it a moment ago is still
        # taken, as it was then (no one can revoke it meanwhile: the admin needs the
        # database too), so that generation goes on with its ledger rows spooled; a key
        # not seen lately gets the 503. The database is asked again a second later.
        if not graced:
            raise
        _outage.failed(settings.AUTH_DB_OUTAGE_GRACE_SECONDS)
        return cached
    _outage.answered()
    if key is None:
        with _key_lock:
            _key_cache.pop(prefix, None)
        return None
    entry = _CachedKey(key=key, user=key.user, fetched_at=now)
    with _key_lock:
        _key_cache[prefix] = entry
    return entry


# While PostgreSQL is unreachable, keys are served from the cache and the database is asked
# again once a second.
_outage = Outage(
    logger,
    began="database unreachable: API keys read in the last %.0f s are still accepted",
    ended="database reachable again after %.1f s: API keys are read from it again",
)


def _client_address(request: Request) -> str:
    """The address failed authentications are counted against.

    Behind nginx or an ingress, REMOTE_ADDR is the proxy's for every client, so one client's
    bad keys would block all of them: when REMOTE_ADDR is a trusted proxy
    (FORWARDED_ALLOW_IPS, the variable gunicorn reads too; `*` trusts any), the client is
    the right-most X-Forwarded-For entry that is not itself a trusted proxy (an address or
    network of the list). Entries further left are whatever the client sent, and are never
    used.
    """
    remote = str(request.META.get("REMOTE_ADDR") or "unknown")
    any_peer, networks = _trusted_proxies(tuple(settings.FORWARDED_ALLOW_IPS))
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if not forwarded or not (any_peer or _in_networks(remote, networks)):
        return remote
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    if any_peer:
        return hops[-1] if hops else remote
    for hop in reversed(hops):
        if not _in_networks(hop, networks):
            return hop
    return remote


@functools.lru_cache(maxsize=4)
def _trusted_proxies(entries: tuple[str, ...]) -> tuple[bool, tuple[IPNetwork, ...]]:
    """(`*` given, the networks) of FORWARDED_ALLOW_IPS. Its entries are addresses or
    networks (`10.0.0.0/8`), as gunicorn reads them; one that is neither is ignored (gunicorn
    refuses to start with it)."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    return "*" in entries, tuple(networks)


def _in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _refusal(request: Request, exc: exceptions.AuthenticationFailed) -> Exception:
    """What to raise for credentials that did not authenticate: 429 while the client's
    address is blocked (not counted again), else `exc` counted as one failure, or the 429
    once that failure passes the limit. Valid credentials never come here, so a valid key
    or token from a blocked address still gets through (the clients behind one proxy or NAT
    address are not locked out by another's bad credentials) at no cost to the hot path."""
    from quotas import auth_throttle

    address = _client_address(request)
    retry = auth_throttle.blocked_for(address) or auth_throttle.record_failure(address)
    if retry:
        return TooManyAuthFailures(retry)
    return exc


def validate_key(key: ApiKey, user: AbstractBaseUser, now: float | None = None) -> None:
    """Raise the contract's 401 for a revoked or expired key or an inactive owner."""
    if key.revoked_at is not None:
        raise KeyRevoked()
    if key.is_expired(now):
        raise KeyExpired()
    if not user.is_active:
        raise UserInactive()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer tg_...` or `X-API-Key: tg_...`."""

    def authenticate(self, request: Request) -> tuple[Any, KeyPrincipal] | None:
        raw = request.META.get("HTTP_X_API_KEY", "")
        if not raw:
            header = request.META.get("HTTP_AUTHORIZATION", "")
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value:
                return None
            raw = value.strip()
        parsed = keys.key_parse(raw)
        prefix, secret = parsed or ("", "")
        entry = _load_key(prefix) if parsed is not None else None
        if entry is None or not keys.secret_matches(secret, entry.key.secret_hash):
            problem = "Malformed API key." if parsed is None else "Unknown API key."
            raise _refusal(request, exceptions.AuthenticationFailed(problem))
        validate_key(entry.key, entry.user)
        key = entry.key
        principal = KeyPrincipal(
            id=key.pk, prefix=key.prefix, user_id=key.user_id, scopes=tuple(key.scopes or ())
        )
        from quotas.services import key_touch

        key_touch(key_id=key.pk, last_used_at=key.last_used_at)
        return entry.user, principal

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class BearerTokenAuthentication(authentication.TokenAuthentication):
    """DRF token: `Authorization: Token <token>`; refuses inactive users with user_inactive.
    A malformed or unknown token counts against the same throttle as a bad API key."""

    keyword = "Token"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        try:
            return super().authenticate(request)
        except exceptions.AuthenticationFailed as exc:
            raise _refusal(request, exc) from None

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        from rest_framework.authtoken.models import Token

        try:
            token = Token.objects.select_related("user").get(key=key)
        except Token.DoesNotExist as exc:
            raise exceptions.AuthenticationFailed("Invalid token.") from exc
        if not token.user.is_active:
            raise UserInactive()
        return token.user, token

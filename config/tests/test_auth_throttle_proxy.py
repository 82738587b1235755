"""Failed authentications behind a proxy are counted per client, not per proxy."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db

BAD = "Bearer tg_abcdefgh_" + "x" * 43


@pytest.fixture
def throttle(settings, redis_conn):
    from quotas import auth_throttle

    settings.AUTH_FAILURES_PER_MINUTE = 3
    auth_throttle.reset()
    yield
    auth_throttle.reset()


def _code(client, key: str, forwarded: str, proxy: str = "10.0.0.5") -> str:
    response = client.get(
        "/api/v1/quota",
        HTTP_AUTHORIZATION=key,
        HTTP_X_FORWARDED_FOR=forwarded,
        REMOTE_ADDR=proxy,
    )
    return "ok" if response.status_code == 200 else response.json()["error"]["code"]


def test_auth_failures_behind_trusted_proxy_block_only_that_client(
    throttle, settings, api_client, api_key
):
    settings.FORWARDED_ALLOW_IPS = ["*"]
    good = f"Bearer {api_key[0]}"

    attacker = [_code(api_client, BAD, "203.0.113.7") for _ in range(5)]
    # A client cannot pick its own address: nginx appends the real one on the right.
    spoofed = _code(api_client, BAD, "198.51.100.1, 203.0.113.7")
    neighbour = _code(api_client, good, "198.51.100.1")

    assert attacker[:3] == ["authentication_failed"] * 3
    assert attacker[3:] == ["too_many_authentication_failures"] * 2
    assert spoofed == "too_many_authentication_failures"
    assert neighbour == "ok"


def test_auth_failures_from_untrusted_peer_ignore_x_forwarded_for(
    throttle, settings, api_client, api_key
):
    settings.FORWARDED_ALLOW_IPS = ["127.0.0.1"]

    codes = [_code(api_client, BAD, f"192.0.2.{i}", proxy="10.0.0.9") for i in range(5)]

    assert codes[3:] == ["too_many_authentication_failures"] * 2


def test_auth_failures_behind_a_proxy_trusted_by_network_block_only_that_client(
    throttle, settings, api_client, api_key
):
    # gunicorn takes networks in FORWARDED_ALLOW_IPS (an ingress's pod range): so must the
    # throttle, or every client behind the ingress shares the ingress's address.
    settings.FORWARDED_ALLOW_IPS = ["10.0.0.0/24"]

    attacker = [_code(api_client, BAD, "203.0.113.7") for _ in range(5)]
    neighbour = _code(api_client, BAD, "198.51.100.1")
    # Another proxy of the network, and a hop of it in the chain, are proxies, not clients.
    through_two = _code(api_client, BAD, "203.0.113.7, 10.0.0.9", proxy="10.0.0.6")
    untrusted = [_code(api_client, BAD, f"192.0.2.{i}", proxy="10.0.1.5") for i in range(4)]

    assert attacker[3:] == ["too_many_authentication_failures"] * 2
    assert neighbour == "authentication_failed"
    assert through_two == "too_many_authentication_failures"
    # A peer outside the network names no client: its failures are its own.
    assert untrusted[3] == "too_many_authentication_failures"

"""Fixtures shared by the tests of config/."""

from __future__ import annotations

import pytest


@pytest.fixture
def key_client(api_client, api_key, redis_conn):
    """A DRF test client that sends `api_key` as its bearer token, Redis flushed."""
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    return api_client

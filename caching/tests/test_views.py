from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from caching.services import (
    cache_get,
    cache_key_topic,
    cache_local_reset,
    cache_set,
    popularity_bump,
)
from quotas.tests.factories import PlanFactory, UserFactory, UserQuotaFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _redis(redis_conn):
    cache_local_reset()
    return redis_conn


@pytest.fixture
def staff_client() -> APIClient:
    staff = UserFactory(username="ops", is_staff=True)
    UserQuotaFactory(user=staff, plan=PlanFactory(requests_per_minute=600))
    client = APIClient()
    client.force_authenticate(staff)
    return client


@pytest.fixture
def user_client() -> APIClient:
    client = APIClient()
    client.force_authenticate(UserFactory(username="alice"))
    return client


def test_stats_shape_and_counts_for_staff(staff_client, local_model):
    cache_set("gen:a", {"x": 1})
    cache_get("gen:a")
    cache_get("gen:nope")
    popularity_bump("Python programming", count=45)

    response = staff_client.get("/api/v1/cache/stats")

    assert response.status_code == 200
    body = response.json()
    assert body["memory"] == {"size": 1, "max_size": 1000, "hits": 1, "misses": 1}
    assert body["redis"] == {"hits": 0, "misses": 1, "hit_rate": 0.0}
    assert body["popular"] == [["python programming", 45]]
    assert response["X-RateLimit-Limit-Requests"] == "600"  # like every authenticated response


def test_stats_refused_to_non_staff(user_client):
    response = user_client.get("/api/v1/cache/stats")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_stats_refused_without_credentials():
    response = APIClient().get("/api/v1/cache/stats")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


def test_stats_sends_etag_and_private_cache_control(staff_client, settings):
    settings.CACHE_CDN_ENABLED = True
    response = staff_client.get("/api/v1/cache/stats")

    assert response["ETag"].startswith('W/"')
    cache_control = response["Cache-Control"]
    assert "private" in cache_control
    assert "max-age=0" in cache_control
    assert "s-maxage" not in cache_control  # never for per-caller data
    assert "Authorization" in response["Vary"]


def test_stats_answers_304_to_matching_if_none_match(staff_client):
    etag = staff_client.get("/api/v1/cache/stats")["ETag"]

    response = staff_client.get("/api/v1/cache/stats", HTTP_IF_NONE_MATCH=etag)

    assert response.status_code == 304
    assert response.content == b""
    assert response["ETag"] == etag


def test_stats_answers_200_with_new_etag_once_data_changed(staff_client):
    etag = staff_client.get("/api/v1/cache/stats")["ETag"]
    popularity_bump("rust")

    response = staff_client.get("/api/v1/cache/stats", HTTP_IF_NONE_MATCH=etag)

    assert response.status_code == 200
    assert response["ETag"] != etag


def test_invalidate_by_pattern_returns_count(staff_client):
    python = cache_key_topic(kind="subtopics", topic="Python", model="m")
    rust = cache_key_topic(kind="subtopics", topic="Rust", model="m")
    cache_set(python, {"x": 1})
    cache_set(rust, {"x": 2})

    response = staff_client.post(
        "/api/v1/cache/invalidate", {"pattern": "topic:python*"}, format="json"
    )

    assert response.status_code == 200
    assert response.json() == {"invalidated": 1}
    assert cache_get(python) is None
    assert cache_get(rust) is not None


def test_invalidate_matches_whatever_the_case_of_the_pattern(staff_client):
    python = cache_key_topic(kind="subtopics", topic="Python", model="m")
    rust = cache_key_topic(kind="subtopics", topic="Rust", model="m")
    cache_set(python, {"x": 1})
    cache_set(rust, {"x": 2})

    response = staff_client.post(
        "/api/v1/cache/invalidate", {"pattern": "Topic:PYTHON*"}, format="json"
    )

    assert response.status_code == 200, response.content
    assert response.json() == {"invalidated": 1}
    assert cache_get(python) is None
    assert cache_get(rust) is not None


def test_invalidate_set_means_the_same_in_memory_as_in_redis(staff_client):
    python = cache_key_topic(kind="subtopics", topic="Python", model="m")
    rust = cache_key_topic(kind="subtopics", topic="Rust", model="m")
    cache_set(python, {"x": 1})
    cache_set(rust, {"x": 2})

    response = staff_client.post(
        "/api/v1/cache/invalidate", {"pattern": "topic:[^p]*"}, format="json"
    )

    assert response.json() == {"invalidated": 1}
    assert cache_get(rust) is None  # gone from this worker's memory too
    assert cache_get(python).layer == "memory"  # untouched in either layer


@pytest.mark.parametrize(
    "pattern", ["[", "topic:[python*", "topic:python\\", "topic:[]*", "topic:[z-a]*"]
)
def test_invalidate_malformed_pattern_is_400_naming_the_field_and_drops_nothing(
    staff_client, pattern
):
    key = cache_key_topic(kind="subtopics", topic="Python", model="m")
    cache_set(key, {"x": 1})

    response = staff_client.post("/api/v1/cache/invalidate", {"pattern": pattern}, format="json")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert list(error["fields"]) == ["pattern"]
    assert error["fields"]["pattern"][0]
    assert cache_get(key) is not None


@pytest.mark.parametrize("body", [{}, {"pattern": ""}, {"pattern": "x" * 600}, {"pattern": 5}])
def test_invalidate_bad_body_is_400(staff_client, body):
    response = staff_client.post("/api/v1/cache/invalidate", body, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


def test_invalidate_malformed_json_is_400(staff_client):
    response = staff_client.post(
        "/api/v1/cache/invalidate", "{nope", content_type="application/json"
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["fields"]["body"] == [error["message"]]
    assert error["message"].startswith("Malformed request body: JSON parse error")


def test_invalidate_refused_to_non_staff(user_client):
    cache_set("gen:a", {"x": 1})

    response = user_client.post("/api/v1/cache/invalidate", {"pattern": "*"}, format="json")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    assert cache_get("gen:a") is not None


def test_admin_page_invalidates_by_pattern(client):
    admin = UserFactory(username="root", is_staff=True, is_superuser=True)
    client.force_login(admin)
    cache_set("topic:python:subtopics:1", {"x": 1})

    page = client.get("/admin/cache/")
    assert page.status_code == 200
    assert b"Invalidate" in page.content

    response = client.post("/admin/cache/", {"pattern": "topic:python*"}, follow=True)

    assert response.status_code == 200
    assert b"Invalidated 1 cached entries" in response.content
    assert cache_get("topic:python:subtopics:1") is None


def test_admin_page_says_why_a_malformed_pattern_is_refused(client):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    cache_set("topic:python:subtopics:1", {"x": 1})

    response = client.post("/admin/cache/", {"pattern": "topic:[python"})

    assert response.status_code == 200
    assert b"never closed" in response.content
    assert cache_get("topic:python:subtopics:1") is not None


def test_admin_page_drops_a_namespace(client):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    cache_set("gen:a", {"x": 1})
    cache_set("topic:python:subtopics:1", {"x": 2})

    response = client.post("/admin/cache/", {"namespace": "gen"}, follow=True)

    assert b"Dropped every cached answer" in response.content
    assert cache_get("gen:a") is None
    assert cache_get("topic:python:subtopics:1") is not None


def test_admin_page_requires_staff(client):
    client.force_login(UserFactory(username="bob"))

    response = client.get("/admin/cache/")

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


@pytest.fixture
def private_redis(settings):
    """A private Redis (config/tests/redis_server.py) the test may stop or make refuse
    writes; settings and the cache tier point at it, never at the shared one."""
    from config.tests.redis_server import PrivateRedis, point_settings_at
    from quotas.services import local_state_reset

    server = PrivateRedis()
    server.start()
    point_settings_at(settings, server)
    cache_local_reset()
    local_state_reset()
    yield server
    server.stop()
    cache_local_reset()
    local_state_reset()


def _refuse(server, refusal: str) -> None:
    """Make `server` unreachable (stopped) or unable to write (out of memory, read-only)."""
    import redis

    if refusal == "stopped":
        server.stop()
    elif refusal == "out-of-memory":
        conn = redis.Redis.from_url(server.url)
        conn.config_set("maxmemory-policy", "noeviction")
        conn.config_set("maxmemory", 1)
    else:  # demoted by a failover to a replica of a master that is not there
        redis.Redis.from_url(server.url).execute_command("REPLICAOF", "127.0.0.1", "1")


@pytest.mark.parametrize("refusal", ["stopped", "out-of-memory", "read-only"])
def test_admin_page_says_redis_is_unavailable_instead_of_failing(client, private_redis, refusal):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    cache_set("topic:python:subtopics:1", {"x": 1})
    popularity_bump("python")
    assert client.get("/admin/cache/").status_code == 200
    _refuse(private_redis, refusal)

    page = client.get("/admin/cache/")
    invalidate = client.post("/admin/cache/", {"pattern": "topic:python*"}, follow=True)
    drop = client.post("/admin/cache/", {"namespace": "gen"}, follow=True)

    assert page.status_code == invalidate.status_code == drop.status_code == 200
    # Statistics are read, which a Redis refusing writes still answers; what it must write
    # fails, and says so.
    assert (b"Redis is unavailable" in page.content) is (refusal == "stopped")
    assert b"Redis is unavailable" in invalidate.content
    assert b"Redis is unavailable" in drop.content
    assert b"Invalidated" not in invalidate.content
    assert b"Dropped every cached answer" not in drop.content

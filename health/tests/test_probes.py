from __future__ import annotations

import json
import socket

import pytest
from django.db.migrations.recorder import MigrationRecorder
from django.test import Client

from health import probes

pytestmark = pytest.mark.django_db


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _fresh_startup_latch():
    probes.startup_latch_reset()
    yield
    probes.startup_latch_reset()


def test_live_answers_ok_without_authentication(client):
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["X-Request-ID"]


def test_ready_all_dependencies_up_is_ok_with_latencies(client, settings):
    settings.HEALTH_REQUIRED_CHECKS = ["database", "redis", "broker"]
    response = client.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "broker"}
    for check in body["checks"].values():
        assert check["status"] == "ok"
        assert check["latency_ms"] >= 0


def test_ready_redis_down_and_optional_is_degraded(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{_closed_port()}/3"
    settings.HEALTH_REQUIRED_CHECKS = ["database"]
    response = client.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["redis"]["status"] == "fail"
    assert body["checks"]["redis"]["required"] is False
    assert body["checks"]["database"]["status"] == "ok"


def test_ready_redis_down_and_required_is_503(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{_closed_port()}/3"
    settings.HEALTH_REQUIRED_CHECKS = ["database", "redis"]
    response = client.get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["redis"]["status"] == "fail"
    assert "latency_ms" in body["checks"]["redis"]


def test_ready_broker_down_is_degraded_by_default(client, settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{_closed_port()}/3"
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert response.json()["checks"]["broker"]["status"] == "fail"


def test_ready_amqp_broker_unreachable_fails_fast(client, settings):
    settings.CELERY_BROKER_URL = f"amqp://guest:guest@127.0.0.1:{_closed_port()}//"
    settings.HEALTH_REQUIRED_CHECKS = ["database", "broker"]
    response = client.get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["broker"]["status"] == "fail"
    # No credentials or URL leak into the probe's body.
    assert "guest" not in response.content.decode()


def test_startup_all_migrations_applied_is_ok(client):
    response = client.get("/health/startup")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("which", ["-name", "name"], ids=["last", "first"])
def test_startup_unapplied_migration_is_503(client, which):
    recorder = MigrationRecorder.Migration.objects
    record = recorder.filter(app="quotas").order_by(which).first()
    assert record is not None
    record.delete()  # as if this migration had not been applied yet (rolled back after)
    response = client.get("/health/startup")
    assert response.status_code == 503
    assert response.json()["status"] == "fail"


def test_startup_once_ok_stays_ok_without_asking_the_database(client, django_assert_num_queries):
    assert client.get("/health/startup").status_code == 200
    with django_assert_num_queries(0):
        assert client.get("/health/startup").status_code == 200


def test_probes_are_not_redirected_to_https(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/health/live").status_code == 200
    assert client.get("/api/v1/quota").status_code == 301


@pytest.mark.slow
def test_probes_with_database_unreachable(tmp_path):
    from health.tests.servers import free_port, gunicorn, http_request

    unreachable = f"postgres://postgres@127.0.0.1:{free_port()}/tollgate"
    with gunicorn(tmp_path, database_url=unreachable, workers=1) as (port, _, _, _):
        assert http_request(port, "GET", "/health/live")[0] == 200
        status, body = http_request(port, "GET", "/health/ready")
        assert status == 503
        report = json.loads(body)
        assert report["status"] == "fail"
        assert report["checks"]["database"]["status"] == "fail"
        assert report["checks"]["redis"]["status"] == "ok"
        assert "postgres://" not in body.decode()
        status, body = http_request(port, "GET", "/health/startup")
        assert status == 503
        assert json.loads(body)["status"] == "fail"


def test_probes_and_metrics_answer_a_host_that_is_not_allowed(client, settings):
    # The kubelet and Prometheus address a pod by its IP, never in ALLOWED_HOSTS.
    settings.ALLOWED_HOSTS = ["tollgate.example.com"]
    settings.METRICS_TOKEN = ""
    for path in ("/health/live", "/health/ready", "/health/startup", "/metrics"):
        response = client.get(path, HTTP_HOST="10.1.2.3:8000")
        assert response.status_code == 200, (path, response.content[:200])
        assert response["X-Request-ID"]
    assert client.post("/health/live", HTTP_HOST="10.1.2.3:8000").status_code == 405
    # Every other path still checks the host.
    assert client.get("/health/live/", HTTP_HOST="10.1.2.3:8000").status_code == 400
    assert client.get("/api/v1/quota", HTTP_HOST="10.1.2.3:8000").status_code == 400


PROBES_AND_SCRAPE = ("/health/live", "/health/ready", "/health/startup", "/metrics")


@pytest.mark.parametrize("path", PROBES_AND_SCRAPE)
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete", "options"])
def test_probes_and_metrics_other_method_is_a_json_405_not_the_csrf_page(
    settings, redis_conn, path, method
):
    settings.METRICS_TOKEN = ""
    client = Client(enforce_csrf_checks=True)  # as a real client meets CSRF

    response = getattr(client, method)(path)

    assert response.status_code == 405, response.content[:200]
    assert response["Allow"] == "GET, HEAD"
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "error": {
            "code": "method_not_allowed",
            "message": f'Method "{method.upper()}" not allowed.',
        }
    }
    assert "no-cache" in response["Cache-Control"]
    assert response["X-Request-ID"]


@pytest.mark.parametrize("path", PROBES_AND_SCRAPE)
def test_probes_and_metrics_answer_head_as_get(client, settings, redis_conn, path):
    settings.METRICS_TOKEN = ""
    settings.HEALTH_REQUIRED_CHECKS = ["database", "redis", "broker"]

    response = client.head(path)

    assert response.status_code == 200
    assert response.content == b""
    assert response["Content-Type"] == client.get(path)["Content-Type"]

"""Metrics under gunicorn with two worker processes (Prometheus multiprocess mode)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict

from health.tests.servers import database_url_of, gunicorn, http_request

pytestmark = pytest.mark.slow

TOKEN = "scrape-token-for-tests"


@pytest.fixture
def gunicorn_server(tmp_path, transactional_db):
    """gunicorn -w 2 on the test database; yields (port, metrics dir, process, warm-up count).

    Transactional: what the server writes (a scrape creates the global limits row) is
    flushed after the test, not left for the next one.
    """
    from django.db import connection

    stale = tmp_path / "prometheus" / "counter_999999.db"
    stale.parent.mkdir()
    stale.write_bytes(b"left over from a previous run")
    with gunicorn(
        tmp_path,
        database_url=database_url_of(connection.settings_dict),
        env={"METRICS_TOKEN": TOKEN},
    ) as server:
        assert not stale.exists()  # the directory was emptied at start
        yield server


def _served_per_worker(metrics_dir: Path, endpoint: str) -> dict[str, float]:
    """tollgate_requests_total{endpoint} as each worker process recorded it in its own file."""
    served: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = path.stem.split("_")[1]
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            metric, name, labels, _ = json.loads(key)
            if name == "tollgate_requests_total" and labels.get("endpoint") == endpoint:
                served[pid] = served.get(pid, 0) + value
    return served


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") and not labels:
            return float(line.rsplit(" ", 1)[1])
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _scrape(port: int) -> str:
    status, body = http_request(
        port, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    return body.decode()


def test_metrics_count_every_request_across_two_gunicorn_workers(gunicorn_server):
    port, metrics_dir, _, warmup = gunicorn_server
    # A known sequence. Until both workers have served probes (the second may still be
    # starting: it loads every view before it serves), send more in parallel, for at most
    # 30 s; every request sent is counted exactly once, whichever worker took it.
    live_sent = warmup
    deadline = time.monotonic() + 30
    with ThreadPoolExecutor(max_workers=8) as pool:
        while time.monotonic() < deadline:
            statuses = list(
                pool.map(lambda _: http_request(port, "GET", "/health/live")[0], range(16))
            )
            assert statuses == [200] * 16
            live_sent += 16
            if len(_served_per_worker(metrics_dir, "/health/live")) >= 2:
                break
    per_worker = _served_per_worker(metrics_dir, "/health/live")
    assert len(per_worker) == 2, per_worker
    assert all(count > 0 for count in per_worker.values())

    big = b'{"prompt": "' + b"x" * 300_000 + b'"}'
    for _ in range(3):
        status, body = http_request(
            port, "POST", "/api/v1/generate", body=big, headers={"Content-Type": "application/json"}
        )
        assert status == 413
        assert json.loads(body)["error"]["code"] == "payload_too_large"
    # A chunked body of unknown length is bounded too.
    chunked = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    chunked.request(
        "POST",
        "/api/v1/generate",
        body=iter([b"y" * 100_000] * 4),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    assert chunked.getresponse().status == 413
    chunked.close()
    for _ in range(2):
        assert http_request(port, "GET", "/no/such/page")[0] == 404

    text = _scrape(port)
    assert (
        _sample(
            text, "tollgate_requests_total", endpoint="/health/live", status="200", cache="none"
        )
        == live_sent
    )
    assert _sample(text, "tollgate_requests_total", endpoint="/api/v1/generate", status="413") == 4
    assert _sample(text, "tollgate_requests_total", endpoint="unmatched", status="404") == 2
    # django-prometheus's own counters add up across the workers too (this scrape included).
    assert _sample(text, "django_http_requests_before_middlewares_total") == live_sent + 4 + 2 + 1
    assert _sample(text, "django_http_responses_total_by_status_total", status="200") == live_sent


def test_metrics_survive_a_worker_restart(gunicorn_server):
    port, metrics_dir, proc, warmup = gunicorn_server
    for _ in range(10):
        assert http_request(port, "GET", "/health/live")[0] == 200
    before = _sample(_scrape(port), "tollgate_requests_total", endpoint="/health/live")
    assert before == 10 + warmup
    worker_pids = {path.stem.split("_")[1] for path in metrics_dir.glob("counter_*.db")}
    victim = int(sorted(worker_pids)[0])
    os.kill(victim, signal.SIGKILL)
    # The master replaces the worker; the dead worker's counts stay in its file.
    deadline = time.monotonic() + 30
    while len({p.stem.split("_")[1] for p in metrics_dir.glob("counter_*.db")} - worker_pids) < 1:
        assert time.monotonic() < deadline, "no replacement worker"
        http_request(port, "GET", "/health/live")
        time.sleep(0.2)
    after = _sample(_scrape(port), "tollgate_requests_total", endpoint="/health/live")
    assert after >= before + 1
    assert proc.poll() is None


def _generate(port: int, key: str, prompt: str) -> int:
    body = json.dumps({"prompt": prompt, "max_tokens": 8}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return http_request(port, "POST", "/api/v1/generate", body=body, headers=headers)[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_conn", "local_model")
def test_generation_metrics_across_workers_after_miss_hit_fallback_and_refusal(gunicorn_server):
    from quotas.services import key_create
    from quotas.tests.factories import PlanFactory, UserFactory, UserQuotaFactory

    port, _, _, _ = gunicorn_server
    plan = PlanFactory(requests_per_minute=2)
    user = UserQuotaFactory(user=UserFactory(), plan=plan).user
    full_key, _ = key_create(user=user, name="metrics")
    statuses = [
        _generate(port, full_key, "how are metrics added up"),  # miss: upstream call
        _generate(port, full_key, "how are metrics added up"),  # hit
        _generate(port, full_key, "how are metrics added up"),  # over the limit: stale copy
        _generate(port, full_key, "a question never asked"),  # over the limit: refused
    ]
    assert statuses == [200, 200, 200, 429]

    text = _scrape(port)
    endpoint = "/api/v1/generate"
    assert (
        _sample(text, "tollgate_requests_total", endpoint=endpoint, status="200", cache="MISS") == 1
    )
    assert (
        _sample(text, "tollgate_requests_total", endpoint=endpoint, status="200", cache="HIT") == 1
    )
    assert (
        _sample(text, "tollgate_requests_total", endpoint=endpoint, status="200", cache="STALE")
        == 1
    )
    assert (
        _sample(text, "tollgate_requests_total", endpoint=endpoint, status="429", cache="none") == 1
    )
    assert _sample(text, "tollgate_stale_fallbacks_total") == 1
    # One upstream call (labelled with the provider's own model name) for the one miss.
    assert (
        _sample(text, "tollgate_upstream_calls_total", provider="local", model="demo", outcome="ok")
        == 1
    )
    # Tokens and cost in the metrics are those charged in the ledger.
    from quotas.models import UsageRecord

    row = UsageRecord.objects.get(user=user, cached=False, fallback=False)
    assert (
        _sample(text, "tollgate_tokens_total", model="local/demo", kind="prompt")
        == row.prompt_tokens
    )
    assert (
        _sample(text, "tollgate_tokens_total", model="local/demo", kind="completion")
        == row.completion_tokens
    )
    assert _sample(text, "tollgate_cost_usd_total", model="local/demo") == pytest.approx(
        float(row.cost_usd)
    )
    assert (
        _sample(
            text,
            "tollgate_quota_decisions_total",
            decision="denied",
            scope="plan",
            dimension="requests_per_minute",
        )
        == 2
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("redis_conn", "local_model")
def test_requests_held_and_the_threads_to_hold_them_are_summed_over_the_workers(tmp_path):
    """Saturation: while three completions wait on a slow provider, the scrape counts them
    (and itself) in flight, against the 2 workers x 4 threads of the default configuration;
    once answered, they no longer count."""
    from django.db import connection

    from quotas.services import key_create
    from quotas.tests.factories import UserFactory

    full_key, _ = key_create(user=UserFactory(), name="saturation")
    with gunicorn(
        tmp_path,
        database_url=database_url_of(connection.settings_dict),
        env={"METRICS_TOKEN": TOKEN, "LOCAL_PROVIDER_LATENCY_MS": "5000"},
    ) as (port, _, _, _):
        deadline = time.monotonic() + 30  # the second worker may still be starting
        while _sample(_scrape(port), "tollgate_http_request_slots") < 8:
            assert time.monotonic() < deadline, "the workers' threads were never counted"
            time.sleep(0.2)
        with ThreadPoolExecutor(max_workers=3) as pool:
            held = [pool.submit(_generate, port, full_key, f"slow {i}") for i in range(3)]
            deadline = time.monotonic() + 4
            while _sample(_scrape(port), "tollgate_http_requests_in_flight") < 4:
                assert time.monotonic() < deadline, "the held requests were never counted"
                time.sleep(0.05)
            text = _scrape(port)
            assert _sample(text, "tollgate_http_requests_in_flight") == 4  # with the scrape
            assert _sample(text, "tollgate_http_request_slots") == 8
            assert [f.result(timeout=30) for f in held] == [200] * 3
        assert _sample(_scrape(port), "tollgate_http_requests_in_flight") == 1

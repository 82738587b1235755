"""End to end as deployed: gunicorn (2 workers, gunicorn.conf.py) and a Celery worker,
each started by the test as its own process, against the real PostgreSQL and Redis, with
the provider faked by a loopback HTTP server speaking the OpenAI wire format. The broker
is Redis, then RabbitMQ (the local server on 5672)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
import redis
from django.conf import settings
from django.db import connection

from generation.tests.fake_upstream import FakeUpstream
from quotas.models import ModelPrice, UsageRecord
from quotas.services import key_create
from quotas.tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(settings.BASE_DIR)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, key: str | None = None):
    request = urllib.request.Request(url, method=method)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"null")


def wait_for(predicate, timeout: float, what: str, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"{what} not reached within {timeout}s\n{tails}")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def broker_url(kind: str) -> str:
    """The broker of this run, emptied of messages left by an earlier run."""
    if kind == "redis":
        redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
        return settings.CELERY_BROKER_URL
    with kombu.Connection(RABBITMQ_URL, connect_timeout=5) as conn:
        channel = conn.default_channel
        for queue in ("default", "jobs"):
            kombu.Queue(queue, channel=channel).declare()
            channel.queue_purge(queue)
    return RABBITMQ_URL


@pytest.fixture(params=["redis", "rabbitmq"])
def stack(request, tmp_path) -> Iterator[dict]:
    broker = broker_url(request.param)
    upstream = FakeUpstream().start()
    port = free_port()
    env = web_env(
        port=port,
        upstream=upstream,
        prometheus_dir=tmp_path / "prometheus",
        CELERY_BROKER_URL=broker,
        CELERY_TASK_ALWAYS_EAGER="0",
        WEB_CONCURRENCY="2",  # and gunicorn.conf.py's default worker class, as deployed
    )
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    web_log, worker_log = tmp_path / "gunicorn.log", tmp_path / "celery.log"
    web = start_web(env, web_log)
    with worker_log.open("w") as worker_out:
        worker = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "config",
                "worker",
                "-Q",
                "default,jobs",
                "--pool=solo",
                "--loglevel=INFO",
                "-n",
                f"e2e-{port}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=worker_out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    logs = [web_log, worker_log]
    try:
        wait_for(lambda: live(base), 60, "gunicorn answering /health/live", logs)
        yield {"base": base, "web": web, "worker": worker, "upstream": upstream, "logs": logs}
    finally:
        stop(web)
        stop(worker)
        upstream.close()
        connection.close()


def gpt_test_model() -> ModelPrice:
    """The OpenAI-compatible model that the fake upstream answers for."""
    return ModelPrice.objects.create(
        model="gpt-test",
        provider="openai",
        upstream_model="gpt-4o-mini",
        input_per_million="0.150000",
        output_per_million="0.600000",
    )


def web_env(*, port: int, upstream: FakeUpstream, prometheus_dir: Path, **extra: str) -> dict:
    """The environment of a gunicorn (gunicorn.conf.py) on `port`, on this test's database
    and Redis, with the fake upstream as its provider; none of the test's own PYTEST_ or
    GUNICORN_ variables."""
    db = settings.DATABASES["default"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "GUNICORN_"))}
    host, db_port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    env.update(
        DATABASE_URL=f"postgres://{db['USER']}@{host}:{db_port}/{db['NAME']}",
        REDIS_URL=settings.REDIS_URL,
        OPENAI_BASE_URL=upstream.openai_base_url,
        OPENAI_API_KEY="sk-test",
        GUNICORN_BIND=f"127.0.0.1:{port}",
        PROMETHEUS_MULTIPROC_DIR=str(prometheus_dir),
        SECURE_SSL_REDIRECT="0",
        DJANGO_SETTINGS_MODULE="config.settings",
        **extra,
    )
    return env


def start_web(env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "gunicorn"), "config.wsgi:application"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def live(base: str) -> bool:
    try:
        return http("GET", f"{base}/health/live")[0] == 200
    except OSError:
        return False


def test_two_gunicorn_workers_and_a_celery_worker_serve_a_job_end_to_end(stack):
    gpt_test_model()
    user = UserFactory()
    key, _ = key_create(user=user, name="e2e")
    base = stack["base"]

    assert len(children(stack["web"].pid)) == 2
    status, headers, body = http(
        "POST",
        f"{base}/api/v1/jobs",
        {
            "topic": "Distributed systems",
            "subtopics": ["Consensus", "Replication"],
            "model": "gpt-test",
        },
        key,
    )
    assert status == 202, body
    assert headers["Location"] == f"/api/v1/jobs/{body['id']}"

    def finished():
        code, _, job = http("GET", f"{base}/api/v1/jobs/{body['id']}", key=key)
        assert code == 200, job
        return job if job["status"] in ("done", "failed") else None

    job = wait_for(finished, 90, "the job finishing", stack["logs"])

    assert job["status"] == "done", job
    assert job["progress"] == {"done": 2, "total": 2, "percent": 100}
    assert [i["subtopic"] for i in job["result"]["items"]] == ["Consensus", "Replication"]
    assert all(i["explanation"] and i["error"] is None for i in job["result"]["items"])
    assert len(stack["upstream"].requests) == 2
    assert UsageRecord.objects.filter(user=user).count() == 2
    # The job ran in the Celery worker process, not inside a web worker.
    worker_log = stack["logs"][1].read_text()
    assert "generation.tasks.job_run" in worker_log
    assert "succeeded" in worker_log
    # Someone else's key cannot read it.
    stranger_key, _ = key_create(user=UserFactory(), name="other")
    assert http("GET", f"{base}/api/v1/jobs/{body['id']}", key=stranger_key)[0] == 404
    # Both workers are still up after serving (no crash), and the master stops cleanly.
    assert len(children(stack["web"].pid)) == 2
    stack["web"].send_signal(signal.SIGTERM)
    assert stack["web"].wait(timeout=40) == 0


def test_a_client_hanging_up_mid_stream_under_gunicorn_is_settled_and_frees_its_lease(
    tmp_path,
):
    """gunicorn closes the response of a client that went away (its next write fails):
    the stream is settled then, for what the client was sent, and its concurrency lease is
    free for the next request at once."""
    from generation.tests.fake_upstream import Behaviour
    from quotas.models import Plan, UserQuota

    gpt_test_model()
    user = UserFactory()
    UserQuota.objects.create(user=user, plan=Plan.objects.create(name="one", concurrency=1))
    key, _ = key_create(user=user, name="e2e")
    upstream = FakeUpstream().start()
    text = " ".join(f"word{i}" for i in range(600))  # some 200 events, 0.05 s apart
    upstream.default = Behaviour(kind="paced", delay=0.05, text=text, usage=(12, 600))
    port = free_port()
    env = web_env(port=port, upstream=upstream, prometheus_dir=tmp_path / "prometheus")
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    log = tmp_path / "gunicorn.log"
    web = start_web(env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: live(base), 60, "gunicorn answering /health/live", [log])
        body = json.dumps(
            {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "go"}]}
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            received = b""
            while received.count(b"data: ") < 3:  # the role and two pieces of text
                received += client.recv(4096)
        # The client has hung up, some 190 events before the end.

        row = wait_for(
            lambda: UsageRecord.objects.filter(user=user).first(), 15, "the ledger row", [log]
        )
        status, _, answer = http(
            "POST",
            f"{base}/api/v1/generate",
            {"prompt": "next", "model": "gpt-test", "cache": "bypass"},
            key,
        )
    finally:
        stop(web)
        upstream.close()
        connection.close()

    assert 0 < row.completion_tokens < 600  # what it was sent, not the whole answer
    assert status == 200, answer  # concurrency 1: the lease was freed

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from caching.services import (
    cache_fresh_for,
    cache_get,
    cache_get_stale,
    cache_local_reset,
    cache_set,
    popularity_bump,
    popularity_top,
)
from caching.tasks import cache_popular_refresh
from caching.warming import topic_key
from quotas.models import UsageRecord
from quotas.tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _redis(redis_conn, local_model):
    cache_local_reset()
    return redis_conn


@pytest.fixture
def operator():
    return UserFactory(username="ops", is_staff=True, is_superuser=True)


def _warm(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("warm_cache", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _warm_failing(*args: str, message: str) -> tuple[str, str]:
    """`_warm` of a run that ends in CommandError `message` (exit status 1)."""
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError, match=message):
        call_command("warm_cache", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_warm_cache_fills_cache_for_listed_topics(tmp_path, operator):
    topics = tmp_path / "topics.txt"
    topics.write_text("# ops list\nPython programming\n\nRust\n  python   PROGRAMMING \n")

    out, err = _warm("--topics-file", str(topics))

    assert "warmed 2, already cached 0, failed 0" in out
    assert "2/2" in err  # the progress bar
    for topic in ("python programming", "rust"):
        hit = cache_get(topic_key(topic=topic))
        assert hit is not None
        assert len(hit.value["subtopics"]) == 6
    rows = UsageRecord.objects.filter(user=operator)
    assert rows.count() == 2  # charged to the operator, like any request


def test_warm_cache_skips_topics_already_cached(tmp_path, operator):
    cache_set(topic_key(topic="rust"), {"subtopics": ["a", "b", "c"], "usage": {}})
    topics = tmp_path / "topics.txt"
    topics.write_text("rust\ngo\n")

    out, _ = _warm("--topics-file", str(topics))

    assert "warmed 1, already cached 1, failed 0" in out
    assert cache_get(topic_key(topic="rust")).value["subtopics"] == ["a", "b", "c"]
    assert cache_get(topic_key(topic="go")) is not None


def test_warm_cache_top_uses_popularity(operator):
    popularity_bump("Django", count=20)
    popularity_bump("Flask", count=5)
    popularity_bump("Bottle", count=1)

    out, _ = _warm("--top", "2")

    assert "warmed 2" in out
    assert cache_get(topic_key(topic="django")) is not None
    assert cache_get(topic_key(topic="flask")) is not None
    assert cache_get(topic_key(topic="bottle")) is None


def test_warm_cache_refuses_bad_arguments(tmp_path, operator):
    with pytest.raises(CommandError, match="--top"):
        _warm()
    with pytest.raises(CommandError, match="Cannot read"):
        _warm("--topics-file", str(tmp_path / "missing.txt"))
    with pytest.raises(CommandError, match="between 3 and 12"):
        _warm("--top", "3", "--count", "40")


@pytest.mark.parametrize("model", ["nope/x", "local/off", "local/other"])
def test_warm_cache_with_a_model_its_account_cannot_use_is_refused_up_front(
    tmp_path, operator, model
):
    # Unknown, disabled, or not on the warming account's plan: every topic would fail alike.
    from quotas.tests.factories import ModelPriceFactory, PlanFactory, UserQuotaFactory

    ModelPriceFactory(model="local/off", enabled=False)
    ModelPriceFactory(model="local/other")
    UserQuotaFactory(user=operator, plan=PlanFactory(allowed_models=["local/demo", "local/off"]))
    topics = tmp_path / "topics.txt"
    topics.write_text("rust\ngo\n")

    with pytest.raises(CommandError, match=model):
        _warm("--topics-file", str(topics), "--model", model)
    assert not UsageRecord.objects.exists()


def test_warm_cache_that_warms_not_every_topic_exits_with_an_error(tmp_path, operator):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    UserQuotaFactory(user=operator, plan=PlanFactory(requests_per_day=1))
    topics = tmp_path / "topics.txt"
    topics.write_text("rust\ngo\n")

    out, err = _warm_failing(
        "--topics-file", str(topics), message="1 of 2 topics could not be warmed"
    )
    assert "warmed 1, already cached 0, failed 1" in out
    assert "go: quota_exceeded" in err


def test_warm_cache_without_an_account_to_charge_is_refused(tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("rust\n")

    with pytest.raises(CommandError, match="superuser"):
        _warm("--topics-file", str(topics))


def test_popular_refresh_recomputes_popular_topics_due_and_decays(operator, settings):
    settings.CACHE_POPULAR_THRESHOLD = 10
    old = {"subtopics": ["old1", "old2", "old3"], "usage": {}}
    cache_set(topic_key(topic="python"), old, ttl=600)  # expires before the next run
    cache_set(topic_key(topic="go"), old, ttl=7200)  # still fresh at the next run
    popularity_bump("python", count=12)
    popularity_bump("go", count=30)
    popularity_bump("rust", count=11)  # popular, never cached
    popularity_bump("cobol", count=2)  # not popular

    result = cache_popular_refresh()

    assert result == {"warmed": 2, "cached": 1, "failed": {}}
    assert cache_get(topic_key(topic="python")).value["subtopics"] != old["subtopics"]
    assert cache_fresh_for(topic_key(topic="python")) > 3000
    assert cache_get(topic_key(topic="go")).value == old
    assert cache_get(topic_key(topic="rust")) is not None
    assert cache_get(topic_key(topic="cobol")) is None
    assert popularity_top() == [("go", 15), ("python", 6), ("rust", 5), ("cobol", 1)]


def test_refresh_keeps_stale_copy_when_recompute_fails(operator, settings):
    from quotas.models import ModelPrice

    old = {"subtopics": ["old1", "old2", "old3"], "usage": {}}
    cache_set(topic_key(topic="python"), old, ttl=60)
    popularity_bump("python", count=50)
    ModelPrice.objects.filter(model="local/demo").update(enabled=False)  # generation fails

    result = cache_popular_refresh()

    assert result["failed"] == {"python": "invalid_request"}
    # Nothing new: the answer is served as it was, fresh until its own end, then stale.
    assert cache_get(topic_key(topic="python")).value == old
    stale = cache_get_stale(topic_key(topic="python"))
    assert stale is not None
    assert stale.value == old


def test_warm_cache_without_a_shared_cache_refuses_to_run(tmp_path, operator, settings):
    # The embedded default: the server's cache is in its own process, out of this one's reach.
    settings.REDIS_URL = ""
    topics = tmp_path / "topics.txt"
    topics.write_text("Python programming\n")

    with pytest.raises(CommandError, match="REDIS_URL is not set"):
        _warm("--topics-file", str(topics))
    assert not UsageRecord.objects.exists()  # nothing computed, nothing charged


def test_refresh_refused_by_a_quota_is_reported_failed_not_warmed(operator, settings):
    from quotas.tests.factories import PlanFactory, UserQuotaFactory

    old = {"subtopics": ["old1", "old2", "old3"], "usage": {}}
    cache_set(topic_key(topic="python"), old, ttl=60)
    popularity_bump("python", count=50)
    # The warming account's plan refuses every request, and allows stale fallbacks.
    plan = PlanFactory(requests_per_minute=0, allow_stale_fallback=True)
    UserQuotaFactory(user=operator, plan=plan)

    result = cache_popular_refresh()

    # What the quota let through is the old answer (a client would get it as a fallback):
    # nothing was warmed, and the answer is still due (fresh for less than the period).
    assert result["warmed"] == 0
    assert result["failed"] == {"python": "quota_exceeded"}
    assert 0 < cache_fresh_for(topic_key(topic="python")) <= 60
    assert cache_get_stale(topic_key(topic="python")).value == old


def test_refresh_that_cannot_compute_leaves_clients_the_fresh_answer(
    operator, settings, api_client, api_key
):
    """The provider fails while popular topics are refreshed: clients are still served the
    answer that had half an hour of freshness left (a hit), not sent upstream to fail."""
    old = {"subtopics": ["old1", "old2", "old3"], "usage": {}}
    cache_set(topic_key(topic="python"), old, ttl=1800)
    popularity_bump("python", count=50)
    settings.LOCAL_PROVIDER_FAILURE_RATE = 1.0
    settings.UPSTREAM_MAX_ATTEMPTS = 1

    result = cache_popular_refresh()
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    response = api_client.post("/api/v1/topics/subtopics", {"topic": "Python"}, format="json")

    assert result["failed"] == {"python": "upstream_error"}
    assert response.status_code == 200, response.content
    assert response["X-Cache"] == "HIT"
    assert [n["label"] for n in response.json()["nodes"][1:]] == old["subtopics"]
    assert cache_fresh_for(topic_key(topic="python")) > 1700


def _process_state_reset() -> None:
    from generation.resilience import _redis_away, _scripts
    from quotas.authentication import key_cache_clear
    from quotas.services import local_state_reset

    local_state_reset()
    cache_local_reset()
    key_cache_clear()
    _scripts.clear()
    _redis_away.reset()


@pytest.fixture
def private_redis(settings):
    """A private Redis (config/tests/redis_server.py) the test may stop or make refuse
    writes; settings and process state point at it, never at the shared one."""
    from config.tests.redis_server import PrivateRedis, point_settings_at

    server = PrivateRedis()
    server.start()
    point_settings_at(settings, server)
    _process_state_reset()
    yield server
    server.stop()
    _process_state_reset()


def _refuse(server, refusal: str) -> None:
    """Make `server` unreachable (stopped) or unable to write (out of memory, read-only)."""
    import redis

    if refusal == "stopped":
        server.stop()
    elif refusal == "out-of-memory":
        redis.Redis.from_url(server.url).config_set("maxmemory", 1)
    else:  # demoted by a failover to a replica of a master that is not there
        redis.Redis.from_url(server.url).execute_command("REPLICAOF", "127.0.0.1", "1")


REFUSALS = ["stopped", "out-of-memory", "read-only"]


@pytest.mark.parametrize("refusal", REFUSALS)
@pytest.mark.parametrize("which", ["--top", "--topics-file"])
def test_warm_cache_with_redis_that_cannot_take_the_answers_warms_nothing_and_says_why(
    private_redis, tmp_path, operator, which, refusal
):
    # The answers would reach this command's memory alone, out of every server's reach,
    # while their provider calls were charged: the run is refused before any topic.
    topics = tmp_path / "topics.txt"
    topics.write_text("rust\ngo\n")
    popularity_bump("rust", count=3)
    _refuse(private_redis, refusal)
    out = StringIO()

    with pytest.raises(CommandError, match=r"Redis .* cannot take") as info:
        call_command("warm_cache", which, "3" if which == "--top" else str(topics), stdout=out)

    assert private_redis.url.split("/")[2] in str(info.value)  # which Redis
    assert "warmed" not in out.getvalue()
    assert not UsageRecord.objects.exists()  # nothing computed, nothing charged


def test_warm_cache_with_redis_unreachable_exits_1_without_a_traceback(private_redis, settings):
    import subprocess
    import sys

    private_redis.stop()
    env = {
        "PATH": "/usr/bin:/bin",
        "SECRET_KEY": settings.SECRET_KEY,
        "REDIS_URL": private_redis.url,
        "CELERY_BROKER_URL": private_redis.url,
    }

    done = subprocess.run(  # noqa: S603 - this interpreter, our manage.py
        [sys.executable, "manage.py", "warm_cache", "--top", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(settings.BASE_DIR),
        check=False,
    )

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("CommandError: Redis")


def test_warm_cache_whose_redis_goes_away_midway_reports_the_rest_not_warmed(
    private_redis, tmp_path, operator, monkeypatch
):
    from generation.services import topic_answers

    bump = topic_answers.popularity_bump

    def redis_stops_at_go(topic: str, **kwargs: int) -> None:
        if topic == "go":  # Redis goes away as the second topic is computed
            private_redis.stop()
        bump(topic, **kwargs)

    monkeypatch.setattr(topic_answers, "popularity_bump", redis_stops_at_go)
    topics = tmp_path / "topics.txt"
    topics.write_text("rust\ngo\n")

    out, err = _warm_failing(
        "--topics-file", str(topics), message="1 of 2 topics could not be warmed"
    )
    assert "warmed 1, already cached 0, failed 1" in out
    assert "go: redis_unavailable" in err

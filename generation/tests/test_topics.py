from __future__ import annotations

import json

import pytest

from generation.tests.fake_upstream import Behaviour
from quotas.models import UsageRecord

SUBTOPICS = "/api/v1/topics/subtopics"
EXPLANATIONS = "/api/v1/topics/explanations"


def _letters(key_client):
    """Three subtopics of "Letters" from the fake upstream's model."""
    return key_client.post(
        SUBTOPICS, {"topic": "Letters", "count": 3, "model": "gpt-test"}, format="json"
    )


@pytest.mark.django_db
def test_subtopics_returns_graph_rooted_at_topic(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(
        text=json.dumps({"subtopics": ["Syntax", "Types", "Modules", "Testing"]}), usage=(90, 30)
    )

    response = key_client.post(
        SUBTOPICS, {"topic": "Python programming", "count": 3, "model": "gpt-test"}, format="json"
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["topic"] == "Python programming"
    assert [n["label"] for n in body["nodes"]] == [
        "Python programming",
        "Syntax",
        "Types",
        "Modules",
    ]
    assert all(e["source"] == "root" for e in body["edges"])
    assert len(body["edges"]) == 3
    assert body["cost_usd"] == "0.0000315"  # 90 x 0.15 / 1e6 + 30 x 0.60 / 1e6, exact
    prompt = fake_upstream.requests[0].body["messages"][-1]["content"]
    assert "Topic: Python programming" in prompt
    assert "JSON" in prompt


@pytest.mark.django_db
def test_subtopics_same_topic_any_case_is_a_cache_hit(
    upstream_settings, fake_upstream, openai_model, key_client
):
    body = {"topic": "Python programming", "count": 4, "model": "gpt-test"}
    key_client.post(SUBTOPICS, body, format="json")

    again = key_client.post(SUBTOPICS, {**body, "topic": "  python   PROGRAMMING "}, format="json")

    assert again.status_code == 200
    assert again["X-Cache"] == "HIT"
    assert again.json()["cached"] is True
    assert len(fake_upstream.requests) == 1


@pytest.fixture
def deploy_prompts(settings, tmp_path):
    """Deploy changed prompts: templates/prompts/<name>.txt replaced by the given text,
    in a new process (which reads the prompts anew)."""
    from generation import topics

    def deploy(**texts: str) -> None:
        (tmp_path / "prompts").mkdir(exist_ok=True)
        for name, text in texts.items():
            (tmp_path / "prompts" / f"{name}.txt").write_text(text)
        engine = settings.TEMPLATES[0]
        settings.TEMPLATES = [{**engine, "DIRS": [tmp_path, *engine["DIRS"]]}]
        topics.prompts_version.cache_clear()

    yield deploy
    topics.prompts_version.cache_clear()


@pytest.mark.django_db
def test_subtopics_cached_under_old_prompts_are_not_served_after_a_deploy_that_changed_them(
    upstream_settings, fake_upstream, openai_model, key_client, deploy_prompts
):
    from caching.services import cache_invalidate

    fake_upstream.default = Behaviour(text=json.dumps({"subtopics": ["Old", "Older", "Oldest"]}))
    body = {"topic": "Python", "count": 3, "model": "gpt-test"}
    assert key_client.post(SUBTOPICS, body, format="json").status_code == 200
    deploy_prompts(subtopics="List {{ count }} subtopics of {{ topic }}, as JSON.")
    fake_upstream.default = Behaviour(text=json.dumps({"subtopics": ["New", "Newer", "Newest"]}))

    again = key_client.post(SUBTOPICS, {**body, "topic": "python"}, format="json")

    assert again["X-Cache"] == "MISS"
    assert [n["label"] for n in again.json()["nodes"][1:]] == ["New", "Newer", "Newest"]
    assert fake_upstream.requests[-1].body["messages"][-1]["content"] == (
        "List 3 subtopics of python, as JSON."
    )
    third = key_client.post(SUBTOPICS, body, format="json")
    assert third["X-Cache"] == "HIT"  # the new prompts' answer, cached as ever
    assert [n["label"] for n in third.json()["nodes"][1:]] == ["New", "Newer", "Newest"]
    # The documented invalidation pattern still reaches every answer about the topic.
    assert cache_invalidate(pattern="topic:python*") == 2


@pytest.mark.django_db
def test_subtopics_malformed_answer_is_repaired_without_asking_again(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(text='```json\n{"subtopics": ["A", "B", "C",]}\n```')

    response = _letters(key_client)

    assert response.status_code == 200
    assert [n["label"] for n in response.json()["nodes"][1:]] == ["A", "B", "C"]
    assert len(fake_upstream.requests) == 1


@pytest.mark.django_db
def test_subtopics_unreadable_answer_is_asked_again_once_and_both_calls_charged(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.script(
        Behaviour(text="I cannot do JSON today.", usage=(100, 10)),
        Behaviour(text='{"subtopics": ["X", "Y", "Z"]}', usage=(150, 20)),
    )

    response = _letters(key_client)

    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 250
    assert len(fake_upstream.requests) == 2
    retry_messages = fake_upstream.requests[1].body["messages"]
    assert retry_messages[-2] == {"role": "assistant", "content": "I cannot do JSON today."}


@pytest.mark.django_db
def test_subtopics_short_answer_is_asked_again_once_and_completed(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.script(
        Behaviour(text='{"subtopics": ["Vowels", "vowels", "Letters"]}', usage=(100, 10)),
        Behaviour(text='{"subtopics": ["Vowels", "Consonants", "Digraphs"]}', usage=(150, 20)),
    )

    response = _letters(key_client)

    assert response.status_code == 200, response.content
    body = response.json()
    assert [n["label"] for n in body["nodes"][1:]] == ["Vowels", "Consonants", "Digraphs"]
    assert body["usage"]["prompt_tokens"] == 250
    assert len(fake_upstream.requests) == 2
    asked = fake_upstream.requests[1].body["messages"][-1]["content"]
    assert "gave 1 usable subtopic of the 3 asked for" in asked


@pytest.mark.django_db
def test_subtopics_short_twice_answers_what_it_has(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(text='{"subtopics": ["Vowels", "Consonants"]}')

    response = _letters(key_client)

    assert response.status_code == 200, response.content
    assert [n["label"] for n in response.json()["nodes"][1:]] == ["Vowels", "Consonants"]
    assert len(fake_upstream.requests) == 2


@pytest.mark.django_db
def test_subtopics_still_unreadable_after_asking_again_is_502_refunded(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(text="no")

    response = _letters(key_client)

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert UsageRecord.objects.get().cost_usd == 0


@pytest.mark.django_db
@pytest.mark.parametrize("count", [2, 13])
def test_subtopics_count_out_of_range_is_400(upstream_settings, key_client, count):
    response = key_client.post(SUBTOPICS, {"topic": "x", "count": count}, format="json")

    assert response.status_code == 400
    assert "count" in response.json()["error"]["fields"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        (SUBTOPICS, {"topic": 123, "count": 5}, "topic"),
        (EXPLANATIONS, {"topic": "Go", "subtopics": ["Channels", 42]}, "subtopics"),
    ],
)
def test_topic_text_that_is_not_a_string_is_400(upstream_settings, key_client, url, body, field):
    response = key_client.post(url, body, format="json")

    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]


@pytest.mark.django_db
def test_subtopics_local_provider_answers_offline(upstream_settings, local_model, key_client):
    response = key_client.post(SUBTOPICS, {"topic": "Rust", "count": 5}, format="json")

    assert response.status_code == 200, response.content
    assert len(response.json()["nodes"]) == 6


@pytest.mark.django_db(transaction=True)
def test_explanations_one_failing_item_does_not_fail_the_others(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 2
    fake_upstream.rule("Subtopic: Broken", Behaviour(kind="status", status=500))
    fake_upstream.default = Behaviour(text="An explanation.", usage=(30, 10))
    subtopics = ["Syntax", "Broken", "Types", "Modules", "Testing"]

    response = key_client.post(
        EXPLANATIONS,
        {"topic": "Python", "subtopics": subtopics, "model": "gpt-test"},
        format="json",
    )

    assert response.status_code == 200, response.content
    items = response.json()["items"]
    assert [i["subtopic"] for i in items] == subtopics
    broken = items[1]
    assert broken["explanation"] is None
    assert broken["error"]["code"] == "upstream_error"
    assert all(
        i["explanation"] == "An explanation." and i["error"] is None
        for i in items
        if i["subtopic"] != "Broken"
    )
    body = response.json()
    assert body["usage"]["prompt_tokens"] == 4 * 30
    # Each item costs (30 x 0.15 + 10 x 0.60) / 1e6 = 0.0000105, exactly (four of them).
    assert body["cost_usd"] == "0.000042"
    rows = UsageRecord.objects.order_by("request_id")
    assert [r.outcome for r in rows].count("ok") == 4
    assert [r.outcome for r in rows].count("upstream_error") == 1
    assert len({r.request_id for r in rows}) == 5


@pytest.mark.django_db(transaction=True)
def test_explanations_cached_items_cost_nothing_the_second_time(
    upstream_settings, fake_upstream, openai_model, key_client
):
    body = {"topic": "Go", "subtopics": ["Goroutines", "Channels"], "model": "gpt-test"}
    key_client.post(EXPLANATIONS, body, format="json")

    again = key_client.post(EXPLANATIONS, body, format="json")

    assert again.status_code == 200
    assert [i["cached"] for i in again.json()["items"]] == [True, True]
    assert again.json()["cost_usd"] == "0"
    assert again["X-Cache"] == "HIT"
    assert len(fake_upstream.requests) == 2


@pytest.mark.django_db(transaction=True)
def test_explanations_cached_under_old_prompts_are_not_served_after_a_deploy_that_changed_them(
    upstream_settings, fake_upstream, openai_model, key_client, deploy_prompts
):
    body = {"topic": "Go", "subtopics": ["Goroutines"], "model": "gpt-test"}
    fake_upstream.default = Behaviour(text="The old explanation.")
    key_client.post(EXPLANATIONS, body, format="json")
    deploy_prompts(explanation_system="You explain things to children.")
    fake_upstream.default = Behaviour(text="The new explanation.")

    again = key_client.post(EXPLANATIONS, body, format="json")

    assert [(i["explanation"], i["cached"]) for i in again.json()["items"]] == [
        ("The new explanation.", False)
    ]
    assert fake_upstream.requests[-1].body["messages"][0]["content"] == (
        "You explain things to children."
    )


@pytest.mark.django_db(transaction=True)
def test_explanations_all_items_failing_is_an_error(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.default = Behaviour(kind="status", status=500)

    response = key_client.post(
        EXPLANATIONS, {"topic": "Go", "subtopics": ["A", "B"], "model": "gpt-test"}, format="json"
    )

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


@pytest.mark.django_db
def test_explanations_more_than_twenty_subtopics_is_400(upstream_settings, key_client):
    response = key_client.post(
        EXPLANATIONS, {"topic": "Go", "subtopics": [f"s{i}" for i in range(21)]}, format="json"
    )

    assert response.status_code == 400


@pytest.mark.django_db(transaction=True)  # the request runs in a thread
def test_explanations_idempotency_key_stays_claimed_for_every_round_of_the_pool(
    upstream_settings, fake_upstream, openai_model, api_key, redis_conn
):
    """A claim that lapsed before its request ended would let the client's retry run, and
    be charged, again: 8 subtopics on 2 workers are 4 rounds of calls, each of which may
    wait on another request's identical call, then be retried up to its budget."""
    import threading
    import time

    from django.db import connection
    from rest_framework.test import APIClient

    upstream_settings.EXPLANATIONS_MAX_WORKERS = 2
    upstream_settings.UPSTREAM_MAX_RETRY_SECONDS = 30  # the defaults
    upstream_settings.UPSTREAM_READ_TIMEOUT = 60
    fake_upstream.default = Behaviour(kind="slow", delay=0.3, text="An explanation.")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[0]}")
    body = {"topic": "Rust", "subtopics": [f"Part {i}" for i in range(8)], "model": "gpt-test"}
    done: list = []

    def ask() -> None:
        try:
            done.append(client.post(EXPLANATIONS, body, format="json", HTTP_IDEMPOTENCY_KEY="k1"))
        finally:
            connection.close()

    thread = threading.Thread(target=ask)
    thread.start()
    claims: list = []
    for _ in range(100):  # the request claims its key before its first round
        claims = list(redis_conn.scan_iter("*idem:*"))
        if claims:
            break
        time.sleep(0.02)
    claimed_for = redis_conn.ttl(claims[0])
    thread.join(timeout=30)

    per_call = (
        upstream_settings.UPSTREAM_MAX_RETRY_SECONDS + upstream_settings.UPSTREAM_READ_TIMEOUT
    )
    assert claimed_for >= 4 * 2 * per_call
    assert done[0].status_code == 200


@pytest.mark.django_db
@pytest.mark.usefixtures("upstream_settings", "openai_model")
@pytest.mark.parametrize(("room", "status"), [("one call", 429), ("two calls", 200)])
def test_subtopics_reserves_for_its_re_ask_so_no_budget_ends_past_its_limit(
    fake_upstream, api_key, key_client, room, status
):
    # A malformed first answer makes a second call, charged too: a budget with room for one
    # call's estimate only would end past its limit, so the request is refused up front.
    from generation import topics
    from generation.services.completion import DEFAULT_MAX_TOKENS
    from generation.tokens import tokens_count_messages
    from quotas.models import Plan, UserQuota

    prompt = tokens_count_messages(topics.subtopics_messages(topic="Elixir", count=3))
    one, two = prompt + DEFAULT_MAX_TOKENS, 2 * prompt + 3 * DEFAULT_MAX_TOKENS
    budget = one + 10 if room == "one call" else two
    plan = Plan.objects.create(name="tight", tokens_per_day=budget)
    UserQuota.objects.update_or_create(user=api_key[1].user, defaults={"plan": plan})
    fake_upstream.script(
        Behaviour(text="not a list at all", usage=(prompt, 20)),
        Behaviour(text=json.dumps({"subtopics": ["A", "B", "C"]}), usage=(prompt + 30, 20)),
    )

    response = key_client.post(
        SUBTOPICS, {"topic": "Elixir", "count": 3, "model": "gpt-test"}, format="json"
    )

    assert response.status_code == status, response.content
    if status == 429:
        assert response.json()["error"]["dimension"] == "tokens_per_day"
        assert not fake_upstream.requests
    else:
        assert len(fake_upstream.requests) == 2  # the re-ask
        row = UsageRecord.objects.get()
        assert row.prompt_tokens + row.completion_tokens <= budget


@pytest.mark.django_db(transaction=True)
def test_explanations_pool_never_outruns_the_callers_concurrency_limit(
    upstream_settings, fake_upstream, openai_model, api_key, key_client
):
    # A plan allowing 2 requests in flight: a batch of 5 on a pool of 4 would have its own
    # items refused for concurrency by each other, an error the client did not cause.
    from quotas.models import Plan, UserQuota

    plan = Plan.objects.create(name="two-at-a-time", concurrency=2)
    UserQuota.objects.update_or_create(user=api_key[1].user, defaults={"plan": plan})
    upstream_settings.EXPLANATIONS_MAX_WORKERS = 4
    fake_upstream.default = Behaviour(kind="slow", delay=0.3, text="An explanation.")
    subtopics = ["One", "Two", "Three", "Four", "Five"]

    response = key_client.post(
        EXPLANATIONS,
        {"topic": "Counting", "subtopics": subtopics, "model": "gpt-test"},
        format="json",
    )

    assert response.status_code == 200, response.content
    items = response.json()["items"]
    assert [i["error"] for i in items] == [None] * 5
    assert all(i["explanation"] == "An explanation." for i in items)
    assert len(fake_upstream.requests) == 5


@pytest.mark.django_db
def test_subtopics_re_ask_failing_upstream_answers_the_first_short_list_charged_once(
    upstream_settings, fake_upstream, openai_model, key_client
):
    # The first call answered usable subtopics, only fewer than asked: the re-ask failing
    # must not throw them away (a 502) nor leave the call the provider billed uncharged.
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.script(
        Behaviour(text='{"subtopics": ["Vowels", "Consonants"]}', usage=(100, 10)),
        Behaviour(kind="status", status=500),
    )

    response = _letters(key_client)

    assert response.status_code == 200, response.content
    body = response.json()
    assert [n["label"] for n in body["nodes"][1:]] == ["Vowels", "Consonants"]
    assert body["usage"]["prompt_tokens"] == 100
    assert len(fake_upstream.requests) == 2
    row = UsageRecord.objects.get()
    assert (row.outcome, row.prompt_tokens, row.completion_tokens) == ("ok", 100, 10)
    assert body["cost_usd"] == "0.000021"  # 100 x 0.15 / 1e6 + 10 x 0.60 / 1e6


@pytest.mark.django_db
def test_subtopics_unreadable_then_re_ask_failing_upstream_is_that_error_refunded(
    upstream_settings, fake_upstream, openai_model, key_client
):
    upstream_settings.UPSTREAM_MAX_ATTEMPTS = 1
    fake_upstream.script(
        Behaviour(text="I cannot do JSON today.", usage=(100, 10)),
        Behaviour(kind="status", status=500),
    )

    response = _letters(key_client)

    assert response.status_code == 502, response.content
    assert response.json()["error"]["code"] == "upstream_error"
    assert UsageRecord.objects.get().cost_usd == 0


@pytest.mark.django_db
def test_subtopics_answer_cut_short_by_max_tokens_keeps_its_complete_items(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.script(
        Behaviour(text='{"subtopics": ["Vowels", "Consonants", "Dig', finish="length"),
        Behaviour(text='{"subtopics": ["Vowels", "Consonants", "Digraphs', finish="length"),
    )

    response = _letters(key_client)

    assert response.status_code == 200, response.content
    assert [n["label"] for n in response.json()["nodes"][1:]] == ["Vowels", "Consonants"]
    asked = fake_upstream.requests[1].body["messages"][-1]["content"]
    assert "gave 2 usable subtopics of the 3 asked for" in asked


@pytest.mark.django_db
def test_subtopics_answer_of_endlessly_nested_brackets_is_502_not_500(
    upstream_settings, fake_upstream, openai_model, key_client
):
    fake_upstream.default = Behaviour(text="[" * 5000)

    response = _letters(key_client)

    assert response.status_code == 502, response.content
    assert response.json()["error"]["code"] == "upstream_error"
    assert UsageRecord.objects.get().cost_usd == 0

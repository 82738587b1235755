"""The topic endpoints: a topic's subtopic graph and explanations of its subtopics, each
answer going through the request path of generation.services.completion."""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connections

from caching.services import cache_key_topic, popularity_bump, topic_normalise
from config.errors import ApiError
from generation import topics
from generation.errors import GenerationError, UpstreamError
from generation.providers.base import CompletionRequest
from generation.resilience import upstream_complete
from generation.services.completion import ZERO, Caller, Outcome, generation_run, money
from quotas.services import policy_get

logger = logging.getLogger("tollgate.generation")

# The upstream calls a subtopics request may make: a malformed answer is asked for again.
SUBTOPICS_UPSTREAM_CALLS = 2
# The prompts (templates/prompts/) each kind of answer is built from.
SUBTOPICS_PROMPTS = ("subtopics_system", "subtopics", "subtopics_retry")
EXPLANATION_PROMPTS = ("explanation_system", "explanation")


def _subtopics_compute(
    *, topic: str, count: int, messages: list[dict[str, str]]
) -> Callable[[CompletionRequest, str], dict[str, Any]]:
    def compute(request: CompletionRequest, provider: str) -> dict[str, Any]:
        completion = upstream_complete(provider=provider, request=request)
        labels = topics.subtopics_parse(completion.text, count=count, topic=topic)
        p_tokens, c_tokens = completion.prompt_tokens, completion.completion_tokens
        if len(labels) < count:
            # Re-ask once, showing the model its unreadable or short answer (repeats, the
            # topic itself); both calls are charged. Fewer than `count` only if it is short
            # twice, or short once and the re-ask fails.
            retry = CompletionRequest(
                model=request.model,
                messages=tuple(
                    topics.subtopics_retry_messages(
                        topic=topic,
                        count=count,
                        previous=messages,
                        answer=completion.text,
                        found=len(labels),
                    )
                ),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                task=request.task,
            )
            try:
                again = upstream_complete(provider=provider, request=retry)
            except GenerationError:
                if not labels:
                    raise  # nothing to answer: the request fails, refunded as any failure
                # The first call gave usable subtopics, only fewer than asked: they are
                # the answer, charged as the call that made them (the failed one is not).
                logger.info("subtopics re-ask failed; answering the first call's %d", len(labels))
            else:
                labels = topics.subtopics_parse(again.text, count=count, topic=topic, known=labels)
                p_tokens += again.prompt_tokens
                c_tokens += again.completion_tokens
        if not labels:
            raise UpstreamError("The model's answer could not be read as a list of subtopics.")
        return {
            "subtopics": labels,
            "usage": {"prompt_tokens": p_tokens, "completion_tokens": c_tokens},
        }

    return compute


def topic_subtopics(
    *, caller: Caller, topic: str, count: int, model: str | None, cache_policy: str = "use"
) -> Outcome:
    """The subtopics of `topic` (cached per normalised topic, count and model).
    `cache_policy` as `generation_run`'s: "refresh" recomputes an answer still cached while
    it goes on serving every other request (warming)."""
    model = model or settings.TOLLGATE_DEFAULT_MODEL
    messages = topics.subtopics_messages(topic=topic, count=count)
    popularity_bump(topic)
    return generation_run(
        caller=caller,
        model=model,
        messages=messages,
        max_tokens=None,
        temperature=None,
        cache_policy=cache_policy,
        cache_key=subtopics_cache_key(topic=topic, count=count, model=model),
        task="subtopics",
        compute=_subtopics_compute(topic=topic, count=count, messages=messages),
        upstream_calls=SUBTOPICS_UPSTREAM_CALLS,
        prompt_field="topic",
    )


def subtopics_cache_key(*, topic: str, count: int, model: str) -> str:
    """The cache key of `count` subtopics of `topic` by `model`, from the current prompts."""
    return cache_key_topic(
        kind="subtopics",
        topic=topic,
        model=model,
        extra=str(count),
        prompts=topics.prompts_version(*SUBTOPICS_PROMPTS),
    )


def subtopics_body(outcome: Outcome, *, topic: str) -> dict[str, Any]:
    """The /api/v1/topics/subtopics response body."""
    graph = topics.topic_graph(topic=topic, subtopics=list(outcome.value.get("subtopics", [])))
    return {
        "topic": topic,
        **graph,
        "usage": outcome.usage(),
        "cost_usd": money(outcome.cost),
        "cached": outcome.cached,
        "fallback": outcome.fallback,
    }


@dataclass
class ExplanationItem:
    subtopic: str
    outcome: Outcome | None = None
    error: ApiError | None = None


def explanation_cache_key(*, topic: str, subtopic: str, model: str) -> str:
    """The cache key of the explanation of `subtopic` of `topic` by `model`, from the
    current prompts."""
    return cache_key_topic(
        kind="explanation",
        topic=topic,
        model=model,
        extra=topic_normalise(subtopic),
        prompts=topics.prompts_version(*EXPLANATION_PROMPTS),
    )


def _explain_one(*, caller: Caller, topic: str, subtopic: str, model: str) -> ExplanationItem:
    """One explanation along the request path; an API error becomes the item's error."""
    try:
        outcome = generation_run(
            caller=caller,
            model=model,
            messages=topics.explanation_messages(topic=topic, subtopic=subtopic),
            max_tokens=None,
            temperature=None,
            cache_policy="use",
            cache_key=explanation_cache_key(topic=topic, subtopic=subtopic, model=model),
            task="explanation",
            prompt_field="subtopics",
        )
        return ExplanationItem(subtopic=subtopic, outcome=outcome)
    except ApiError as exc:
        return ExplanationItem(subtopic=subtopic, error=exc)


def _explain_in_pool(*, caller: Caller, topic: str, subtopic: str, model: str) -> ExplanationItem:
    try:
        return _explain_one(caller=caller, topic=topic, subtopic=subtopic, model=model)
    finally:
        # Pool threads are short-lived: close their database connections now.
        connections.close_all()


def _caller_concurrency(*, caller: Caller, model: str) -> int | None:
    """The most requests `caller` may have in flight on `model` (the tightest concurrency
    limit of its policy at its priority), or None: unlimited, or a policy that refuses the
    caller (each item is then refused on its own, as it would be anyway)."""
    try:
        policy = policy_get(user_id=caller.user_id, key_id=caller.key_id, model=model)
    except ApiError:
        return None
    limits = [q.limit for q in policy.quotas_for(caller.priority) if q.dimension == "concurrency"]
    return min(limits) if limits else None


def _explanation_workers(count: int, *, caller: Caller, model: str) -> int:
    # A pool wider than the caller's concurrency limit would have the batch's own items
    # refused for concurrency by each other: at most as many workers as it may have in
    # flight (other requests of the caller in flight may still take some of those slots).
    workers = min(settings.EXPLANATIONS_MAX_WORKERS, count)
    limit = _caller_concurrency(caller=caller, model=model)
    if limit is not None:
        workers = min(workers, limit)
    return max(1, workers)


def explanations_rounds(count: int, *, caller: Caller, model: str | None) -> int:
    """The upstream calls `topic_explanations` of `count` subtopics makes one after
    another: its pool takes them a batch of workers at a time."""
    model = model or settings.TOLLGATE_DEFAULT_MODEL
    return math.ceil(count / _explanation_workers(count, caller=caller, model=model))


def topic_explanations(
    *, caller: Caller, topic: str, subtopics: list[str], model: str | None
) -> list[ExplanationItem]:
    """Explanations of each subtopic, generated in parallel by at most
    EXPLANATIONS_MAX_WORKERS threads, and no more than the caller's concurrency limit;
    every item is admitted, cached and charged on its own (ledger request ids
    `<request id>.<n>`). A failed item carries its error. Raises the first item's error
    when every item failed."""
    model = model or settings.TOLLGATE_DEFAULT_MODEL
    popularity_bump(topic)
    workers = _explanation_workers(len(subtopics), caller=caller, model=model)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="explain") as pool:
        futures = [
            pool.submit(
                contextvars.copy_context().run,
                _explain_in_pool,
                caller=caller.item(index),
                topic=topic,
                subtopic=subtopic,
                model=model,
            )
            for index, subtopic in enumerate(subtopics)
        ]
        items = [f.result() for f in futures]
    if items and all(item.error is not None for item in items):
        first = items[0].error
        assert first is not None  # noqa: S101 - checked just above
        raise first
    return items


def explanations_body(items: list[ExplanationItem]) -> dict[str, Any]:
    """The /api/v1/topics/explanations response body."""
    prompt = sum(i.outcome.prompt_tokens for i in items if i.outcome)
    completion = sum(i.outcome.completion_tokens for i in items if i.outcome)
    cost = sum((i.outcome.cost for i in items if i.outcome), ZERO)
    return {
        "items": [
            {
                "subtopic": item.subtopic,
                "explanation": item.outcome.value.get("text", "") if item.outcome else None,
                "cached": item.outcome.cached if item.outcome else False,
                "error": (
                    {"code": item.error.code, "message": item.error.message} if item.error else None
                ),
            }
            for item in items
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "cost_usd": money(cost),
    }


def explanations_headers(items: list[ExplanationItem]) -> dict[str, str]:
    """Rate-limit headers of the last item that got through (the freshest standing)."""
    for item in reversed(items):
        if item.outcome is not None and item.outcome.headers:
            return item.outcome.headers
    return {}

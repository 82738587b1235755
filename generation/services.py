"""Generation: the request path of DESIGN.md for every generation endpoint.

cache look-up -> admission -> single flight -> upstream (retries, circuit breaker) ->
settlement (or refund on failure) -> cache store. A cache hit only counts one request.
A refused admission serves a stale copy when the policy allows it (`fallback: true`).
Responses carry the rate-limit headers of the admission that let them through.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connections

from caching.services import (
    cache_get,
    cache_get_stale,
    cache_key_generation,
    cache_key_topic,
    cache_set,
    popularity_bump,
    single_flight,
    topic_normalise,
)
from config.errors import ApiError, InvalidRequest
from generation import resilience, topics
from generation.errors import (
    GenerationError,
    IdempotencyConflict,
    UpstreamError,
    UpstreamUnavailable,
)
from generation.providers.base import Completion, CompletionRequest
from generation.resilience import upstream_complete
from generation.tokens import tokens_count_messages
from quotas.errors import QuotaExceeded
from quotas.services import (
    admission_admit,
    admission_count_hit,
    policy_get,
    usage_record_fallback,
    usage_record_hit,
    usage_refund,
    usage_settle,
)

logger = logging.getLogger("tollgate.generation")

DEFAULT_MAX_TOKENS = 256
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the user, the key (None for token or session requests), the request id
    (the ledger's unique id) and the priority class."""

    user_id: int
    key_id: int | None
    request_id: str
    priority: str = "high"

    def item(self, index: int) -> Caller:
        """The caller of the `index`-th item of a batch (its own ledger row)."""
        return Caller(self.user_id, self.key_id, f"{self.request_id[:56]}.{index}", self.priority)


@dataclass
class Outcome:
    """One answer: the cached value, how it was obtained, what it cost."""

    value: dict[str, Any]
    model: str
    cache: str  # HIT | MISS | STALE | BYPASS
    cache_layer: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = ZERO
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.cache in ("HIT", "STALE")

    @property
    def fallback(self) -> bool:
        return self.cache == "STALE"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def circuit_states() -> list[dict[str, Any]]:
    """The circuit breakers' states (for /api/v1/quota/global); see generation.resilience."""
    return resilience.circuit_states()


def money(value: Decimal) -> str:
    """USD as API.md writes it: "0" for nothing, else six decimals."""
    return "0" if not value else f"{value.quantize(Decimal('0.000001'))}"


def _completion_value(completion: Completion) -> dict[str, Any]:
    return {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        },
    }


def generation_run(
    *,
    caller: Caller,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int | None,
    temperature: float | None,
    cache_policy: str,
    cache_key: str | None = None,
    task: str = "chat",
    compute: Callable[[CompletionRequest, str], dict[str, Any]] | None = None,
) -> Outcome:
    """Answer one generation request along the request path; see the module docstring.

    `cache_policy`: "use" (look up, then store), "refresh" (skip the look-up, store) or
    "bypass" (neither). `compute(request, provider)` turns the upstream call into the value
    to cache (default: the completion's text, finish reason and usage).
    Raises InvalidRequest (400: unknown model, max_tokens over the model's limit, prompt over
    its context window), the policy's 401/403, QuotaExceeded (429), UpstreamError (502),
    UpstreamUnavailable (503) or UpstreamTimeout (504); failures after admission are refunded.
    """
    policy = policy_get(user_id=caller.user_id, key_id=caller.key_id, model=model)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, policy.max_output_tokens)
    if max_tokens > policy.max_output_tokens:
        raise InvalidRequest(
            f"max_tokens is over this model's limit of {policy.max_output_tokens}.",
            fields={"max_tokens": [f"At most {policy.max_output_tokens}."]},
        )
    prompt_tokens = tokens_count_messages(messages)
    if prompt_tokens + max_tokens > policy.context_window:
        raise InvalidRequest(
            f"The prompt (about {prompt_tokens} tokens) plus max_tokens exceeds this model's "
            f"context window of {policy.context_window} tokens.",
            fields={"messages": ["Too long for this model."]},
        )
    key = cache_key or cache_key_generation(
        model=model,
        messages=messages,
        params={"max_tokens": max_tokens, "temperature": temperature, "task": task},
    )
    if cache_policy == "use":
        hit = cache_get(key)
        if hit is not None:
            try:
                admission = admission_count_hit(
                    user_id=caller.user_id,
                    key_id=caller.key_id,
                    model=model,
                    request_id=caller.request_id,
                    priority=caller.priority,
                )
            except QuotaExceeded as exc:
                # The request windows are full; the answer is at hand, so a policy that
                # allows stale fallbacks gets it as one.
                if not policy.allow_stale_fallback:
                    raise
                usage_record_fallback(
                    policy=policy,
                    user_id=caller.user_id,
                    key_id=caller.key_id,
                    request_id=caller.request_id,
                    latency_ms=0,
                )
                return Outcome(
                    value=hit.value,
                    model=model,
                    cache="STALE",
                    cache_layer=hit.layer,
                    headers=exc.headers,
                )
            usage_record_hit(admission=admission)
            return Outcome(
                value=hit.value,
                model=model,
                cache="HIT",
                cache_layer=hit.layer,
                headers=admission.headers(),
            )

    started = time.monotonic()
    try:
        admission = admission_admit(
            user_id=caller.user_id,
            key_id=caller.key_id,
            model=model,
            request_id=caller.request_id,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            priority=caller.priority,
        )
    except QuotaExceeded as exc:
        stale = _stale_for(exc, key, cache_policy)
        if stale is None:
            raise
        usage_record_fallback(
            policy=policy,
            user_id=caller.user_id,
            key_id=caller.key_id,
            request_id=caller.request_id,
            latency_ms=int((time.monotonic() - started) * 1000),
        )
        return Outcome(
            value=stale, model=model, cache="STALE", cache_layer="redis", headers=exc.headers
        )

    request = CompletionRequest(
        model=policy.upstream_model,
        messages=tuple(messages),
        max_tokens=max_tokens,
        temperature=temperature,
        task=task,
    )

    def upstream() -> dict[str, Any]:
        if compute is not None:
            return compute(request, policy.provider)
        return _completion_value(upstream_complete(provider=policy.provider, request=request))

    try:
        if cache_policy == "use":
            wait = settings.UPSTREAM_MAX_RETRY_SECONDS + settings.UPSTREAM_READ_TIMEOUT
            value, computed_here = single_flight(key, upstream, wait_seconds=wait)
        else:
            value, computed_here = upstream(), True
            if cache_policy == "refresh":
                cache_set(key, value, broadcast=True)
    except GenerationError as err:
        usage_refund(admission=admission, outcome=err.outcome)
        err.headers = admission.headers()
        if isinstance(err, UpstreamUnavailable) and cache_policy != "bypass":
            copy = cache_get_stale(key) if policy.allow_stale_fallback else None
            if copy is not None:
                return Outcome(
                    value=copy.value,
                    model=model,
                    cache="STALE",
                    cache_layer="redis",
                    headers=err.headers,
                )
        raise
    except BaseException:
        usage_refund(admission=admission, outcome="upstream_error")
        raise

    if not computed_here:
        # Another request made the same call at the same moment: this one rode along.
        usage_settle(admission=admission, prompt_tokens=0, completion_tokens=0, cached=True)
        return Outcome(value=value, model=model, cache="HIT", headers=admission.headers())
    usage = value.get("usage") or {}
    p_tokens, c_tokens = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    cost = usage_settle(admission=admission, prompt_tokens=p_tokens, completion_tokens=c_tokens)
    return Outcome(
        value=value,
        model=model,
        cache="MISS" if cache_policy != "bypass" else "BYPASS",
        prompt_tokens=p_tokens,
        completion_tokens=c_tokens,
        cost=cost,
        headers=admission.headers(),
    )


def _stale_for(exc: QuotaExceeded, key: str, cache_policy: str) -> dict[str, Any] | None:
    policy = getattr(exc, "policy", None)
    if cache_policy == "bypass" or policy is None or not policy.allow_stale_fallback:
        return None
    stale = cache_get_stale(key)
    return stale.value if stale is not None else None


# --- /api/v1/generate and /v1/chat/completions ---------------------------------------------


def completion_create(
    *,
    caller: Caller,
    model: str | None,
    messages: list[dict[str, str]],
    max_tokens: int | None,
    temperature: float | None,
    cache_policy: str = "use",
) -> Outcome:
    """A chat completion (`prompt` requests arrive here as one user message)."""
    return generation_run(
        caller=caller,
        model=model or settings.TOLLGATE_DEFAULT_MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        cache_policy=cache_policy,
    )


def completion_body(outcome: Outcome, *, request_id: str) -> dict[str, Any]:
    """The /api/v1/generate response body."""
    return {
        "id": f"gen_{uuid.uuid4().hex}",
        "request_id": request_id,
        "model": outcome.model,
        "text": outcome.value.get("text", ""),
        "usage": outcome.usage(),
        "cost_usd": money(outcome.cost),
        "cached": outcome.cached,
        "cache_layer": outcome.cache_layer,
        "fallback": outcome.fallback,
    }


# --- idempotency ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored first answer: status, body and headers to send again."""

    status: int
    body: Any
    headers: dict[str, str]


def _idempotency_slot(user_id: int, key: str) -> str:
    return "idem:" + hashlib.sha256(f"{user_id}\x00{key}".encode()).hexdigest()


def idempotency_begin(*, user_id: int, key: str, fingerprint: str) -> Replay | None:
    """Claim an Idempotency-Key for this user: None when the request should run, the stored
    answer when a first one exists. Raises IdempotencyConflict (409) when the same key is in
    flight or was used for a different request body."""
    slot = _idempotency_slot(user_id, key)
    pending = {"state": "pending", "fingerprint": fingerprint}
    budget = int(settings.UPSTREAM_MAX_RETRY_SECONDS + settings.UPSTREAM_READ_TIMEOUT + 30)
    if cache.add(slot, pending, timeout=budget):
        return None
    stored = cache.get(slot)
    if stored is None:  # expired between the two calls
        if cache.add(slot, pending, timeout=budget):
            return None
        stored = cache.get(slot) or pending
    if stored.get("fingerprint") != fingerprint:
        raise IdempotencyConflict("This Idempotency-Key was already used for a different request.")
    if stored.get("state") != "done":
        raise IdempotencyConflict()
    return Replay(status=stored["status"], body=stored["body"], headers=stored["headers"])


def idempotency_finish(*, user_id: int, key: str, fingerprint: str, replay: Replay | None) -> None:
    """Store the first answer for GENERATION_IDEMPOTENCY_TTL seconds, or (None: the request
    failed) release the key so that a retry runs again."""
    slot = _idempotency_slot(user_id, key)
    if replay is None:
        cache.delete(slot)
        return
    cache.set(
        slot,
        {
            "state": "done",
            "fingerprint": fingerprint,
            "status": replay.status,
            "body": replay.body,
            "headers": replay.headers,
        },
        timeout=settings.GENERATION_IDEMPOTENCY_TTL,
    )


def request_fingerprint(path: str, data: Any) -> str:
    """A stable hash of what a request asks for (path and parsed body)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{path}\x00{canonical}".encode()).hexdigest()


# --- topics --------------------------------------------------------------------------------


def _subtopics_compute(
    *, topic: str, count: int, messages: list[dict[str, str]]
) -> Callable[[CompletionRequest, str], dict[str, Any]]:
    def compute(request: CompletionRequest, provider: str) -> dict[str, Any]:
        completion = upstream_complete(provider=provider, request=request)
        labels = topics.subtopics_parse(completion.text, count=count)
        p_tokens, c_tokens = completion.prompt_tokens, completion.completion_tokens
        if not labels:
            # Re-ask once, showing the model its unusable answer; both calls are charged.
            retry = CompletionRequest(
                model=request.model,
                messages=tuple(
                    topics.subtopics_retry_messages(
                        topic=topic, count=count, previous=messages, answer=completion.text
                    )
                ),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                task=request.task,
            )
            again = upstream_complete(provider=provider, request=retry)
            labels = topics.subtopics_parse(again.text, count=count)
            p_tokens += again.prompt_tokens
            c_tokens += again.completion_tokens
        if not labels:
            raise UpstreamError("The model's answer could not be read as a list of subtopics.")
        return {
            "subtopics": labels,
            "usage": {"prompt_tokens": p_tokens, "completion_tokens": c_tokens},
        }

    return compute


def topic_subtopics(*, caller: Caller, topic: str, count: int, model: str | None) -> Outcome:
    """The subtopics of `topic` (cached per normalised topic, count and model)."""
    model = model or settings.TOLLGATE_DEFAULT_MODEL
    messages = topics.subtopics_messages(topic=topic, count=count)
    popularity_bump(topic)
    return generation_run(
        caller=caller,
        model=model,
        messages=messages,
        max_tokens=None,
        temperature=None,
        cache_policy="use",
        cache_key=cache_key_topic(kind="subtopics", topic=topic, model=model, extra=str(count)),
        task="subtopics",
        compute=_subtopics_compute(topic=topic, count=count, messages=messages),
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


def _explain_one(*, caller: Caller, topic: str, subtopic: str, model: str) -> ExplanationItem:
    try:
        outcome = generation_run(
            caller=caller,
            model=model,
            messages=topics.explanation_messages(topic=topic, subtopic=subtopic),
            max_tokens=None,
            temperature=None,
            cache_policy="use",
            cache_key=cache_key_topic(
                kind="explanation", topic=topic, model=model, extra=topic_normalise(subtopic)
            ),
            task="explanation",
        )
        return ExplanationItem(subtopic=subtopic, outcome=outcome)
    except ApiError as exc:
        return ExplanationItem(subtopic=subtopic, error=exc)
    finally:
        # Pool threads are short-lived: close their database connections now.
        connections.close_all()


def topic_explanations(
    *, caller: Caller, topic: str, subtopics: list[str], model: str | None
) -> list[ExplanationItem]:
    """Explanations of each subtopic, generated in parallel by at most
    EXPLANATIONS_MAX_WORKERS threads; every item is admitted, cached and charged on its own
    (ledger request ids `<request id>.<n>`). A failed item carries its error. Raises the
    first item's error when every item failed."""
    model = model or settings.TOLLGATE_DEFAULT_MODEL
    popularity_bump(topic)
    workers = max(1, min(settings.EXPLANATIONS_MAX_WORKERS, len(subtopics)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="explain") as pool:
        futures = [
            pool.submit(
                contextvars.copy_context().run,
                _explain_one,
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


def idempotent_run(
    *, user_id: int, key: str | None, fingerprint: str, run: Callable[[], Replay]
) -> tuple[Replay, bool]:
    """Run `run` once per (user, Idempotency-Key): (answer, replayed). Without a key it just
    runs. A failed run releases the key so that the client's retry runs again (failures are
    refunded, so nothing is charged twice either way)."""
    if not key:
        return run(), False
    replay = idempotency_begin(user_id=user_id, key=key, fingerprint=fingerprint)
    if replay is not None:
        return replay, True
    try:
        answer = run()
    except BaseException:
        idempotency_finish(user_id=user_id, key=key, fingerprint=fingerprint, replay=None)
        raise
    idempotency_finish(user_id=user_id, key=key, fingerprint=fingerprint, replay=answer)
    return answer, False

"""The request path of DESIGN.md for every generation endpoint.

cache look-up -> admission -> single flight -> upstream (retries, circuit breaker) ->
settlement (or refund on failure) -> cache store. A cache hit only counts one request.
A refused admission serves a stale copy when the policy allows it (`fallback: true`).
Responses carry the rate-limit headers of the admission that let them through.

Redis round trips: a hit in this worker's memory, one (the admission call that counts it).
Past the memory layer, the admission script looks the answer up itself (quotas'
CacheGate): a hit in Redis is one round trip; a miss is admitted and takes the
single-flight lock in that same one, and its settlement carries the answer's store and
the lock's release in a second. Plus the ledger INSERT.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings

from caching.services import (
    CacheHit,
    CacheProbe,
    FlightLock,
    PendingStore,
    cache_get_stale,
    cache_key_generation,
    cache_probe,
    cache_probe_found,
    cache_probe_stale,
    cache_set,
    cache_store_later,
    single_flight,
)
from config.errors import InvalidRequest
from generation import resilience
from generation.errors import GenerationError, UpstreamError, UpstreamUnavailable
from generation.providers.base import Completion, CompletionRequest
from generation.resilience import upstream_complete, upstream_stream
from generation.tokens import tokens_count, tokens_count_messages
from quotas.errors import QuotaExceeded
from quotas.policy import Policy, usd_text
from quotas.services import (
    Admission,
    CacheGate,
    Renewal,
    admission_admit,
    admission_count_hit,
    policy_get,
    renewal_start,
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
    # Streams only: the text as it comes (None when the answer is whole in `value`), and
    # the error that cut it short.
    pieces: Iterator[str] | None = None
    error: GenerationError | None = None
    # Streams only: to be called when the response ends, read to its end or not (see
    # `_start_stream`). Settles a stream the client left, exactly once.
    close: Callable[[], None] | None = None
    # A stale copy (STALE): the code of the refusal or failure it stands in for.
    fallback_code: str | None = None

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


def circuit_gauges_refresh() -> None:
    """tollgate_circuit_state of every circuit set from Redis (a scrape); see
    generation.resilience."""
    resilience.circuit_gauges_refresh()


def money(value: Decimal) -> str:
    """USD as API.md writes it: "0" for nothing, else at least six decimals (`usd_text`)."""
    return "0" if not value else usd_text(value)


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
    stream: bool = False,
    upstream_calls: int = 1,
    prompt_field: str = "messages",
    max_tokens_field: str = "max_tokens",
    keep_alive: Callable[[], object] | None = None,
) -> Outcome:
    """Answer one generation request along the request path; see the module docstring.

    `cache_policy`: "use" (look up, then store), "refresh" (skip the look-up, store) or
    "bypass" (neither). `compute(request, provider)` turns the upstream call into the value
    to cache (default: the completion's text, finish reason and usage).
    `upstream_calls`: how many calls `compute` may make (a re-ask: 2); the admission
    reserves for all of them, so that no budget ends up past its limit.
    `prompt_field`: the request's field a prompt too long for the model is blamed on, and
    `max_tokens_field` the one a `max_tokens` over the model's limit is.
    `stream=True`: a miss is not coalesced by single flight; the returned Outcome's `pieces`
    relays the provider's text as it comes, and settles (or refunds) when it ends. Hits and
    stale copies come back whole, as without `stream`. `keep_alive`: called, while a relayed
    stream runs, at each renewal of its lease (`renewal_start`), to keep what lives as long
    as the stream alive with it (its Idempotency-Key's claim).
    Raises InvalidRequest (400: unknown model, max_tokens over the model's limit, prompt over
    its context window), the policy's 401/403, QuotaExceeded (429), UpstreamError (502),
    UpstreamUnavailable (503) or UpstreamTimeout (504); failures after admission are refunded.
    """
    policy = policy_get(user_id=caller.user_id, key_id=caller.key_id, model=model)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, policy.max_output_tokens)
    if max_tokens > policy.max_output_tokens:
        raise InvalidRequest(
            f"{max_tokens_field} is over this model's limit of {policy.max_output_tokens}.",
            fields={max_tokens_field: [f"At most {policy.max_output_tokens}."]},
        )
    key = cache_key or cache_key_generation(
        model=model,
        messages=messages,
        params={"max_tokens": max_tokens, "temperature": temperature, "task": task},
    )
    # The longest `compute` can take: each of its calls, one after another, retried within
    # the retry budget plus one read. The single-flight lock lives that long and identical
    # misses wait that long for its answer: a shorter wait would let them give up on a
    # leader still at work (a subtopics re-ask) and call upstream, and be charged, again.
    wait = max(1, upstream_calls) * (
        settings.UPSTREAM_MAX_RETRY_SECONDS + settings.UPSTREAM_READ_TIMEOUT
    )
    lock: FlightLock | None = None  # the single-flight lock, when the admission took it
    probe: CacheProbe | None = None  # the Redis look-up, done by the admission's script
    pending: PendingStore | None = None  # the answer's store, sent with the settlement
    if cache_policy == "use":
        # A stream is not coalesced by single flight: its miss takes no lock.
        hit, probe = cache_probe(key, lock_seconds=None if stream else wait)
        if hit is not None:  # an answer to these very messages exists: nothing to estimate
            return _serve_hit(hit, caller=caller, policy=policy, model=model)

    admitted = _admit(
        caller=caller,
        policy=policy,
        model=model,
        key=key,
        messages=messages,
        max_tokens=max_tokens,
        cache_policy=cache_policy,
        probe=probe,
        prompt_field=prompt_field,
        upstream_calls=upstream_calls,
    )
    if isinstance(admitted, Outcome):  # a hit the admission's look-up found, or a fallback
        return admitted
    admission, prompt_tokens = admitted
    if probe is not None:
        _, lock = cache_probe_found(probe, None, locked=admission.locked)

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

    if stream:
        return _start_stream(
            request,
            admission=admission,
            key=key,
            cache_policy=cache_policy,
            model=model,
            prompt_tokens=prompt_tokens,
            keep_alive=keep_alive,
        )

    try:
        if cache_policy == "use":
            # Under the look-up's lock, the answer's store rides with the settlement.
            # `layer`: where a request that rode on another's upstream call took its answer.
            value, layer = single_flight(
                key, upstream, wait_seconds=wait, lock=lock, keep_lock=True
            )
            if layer is None and lock is not None:
                pending = cache_store_later(key, value, lock=lock)
        else:
            value, layer = upstream(), None
            if cache_policy == "refresh":
                cache_set(key, value, broadcast=True)
    except GenerationError as err:
        return _upstream_failed(err, admission, key, cache_policy, model)
    except BaseException:
        usage_refund(admission=admission, outcome="upstream_error")
        raise

    if layer is not None:
        # Another request made the same call at the same moment: this one rode along, and
        # is answered as a hit from the layer it took the answer from.
        usage_settle(admission=admission, prompt_tokens=0, completion_tokens=0, cached=True)
        return Outcome(
            value=value, model=model, cache="HIT", cache_layer=layer, headers=admission.headers()
        )
    usage = value.get("usage") or {}
    p_tokens, c_tokens = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    try:
        cost = usage_settle(
            admission=admission,
            prompt_tokens=p_tokens,
            completion_tokens=c_tokens,
            riders=pending.calls if pending is not None else (),
        )
    finally:
        if pending is not None:
            pending.finish()  # stores it on its own if the settlement did not carry it
    return Outcome(
        value=value,
        model=model,
        cache="MISS" if cache_policy != "bypass" else "BYPASS",
        prompt_tokens=p_tokens,
        completion_tokens=c_tokens,
        cost=cost,
        headers=admission.headers(),
    )


def _admit(
    *,
    caller: Caller,
    policy: Policy,
    model: str,
    key: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    cache_policy: str,
    probe: CacheProbe | None,
    upstream_calls: int = 1,
    prompt_field: str = "messages",
) -> tuple[Admission, int] | Outcome:
    """Admission (with the Redis look-up of `probe` in the same round trip): (the
    admission, the prompt's tokens), or the answer itself: a fresh one the look-up found
    (counted as a hit) or, when a quota refuses, a stale copy the policy allows."""
    started = time.monotonic()
    try:
        prompt_tokens = tokens_count_messages(messages)
        if prompt_tokens + max_tokens > policy.context_window:
            raise InvalidRequest(
                f"The prompt (about {prompt_tokens} tokens) plus max_tokens exceeds this "
                f"model's context window of {policy.context_window} tokens.",
                fields={prompt_field: ["Too long for this model."]},
            )
        # Each further call's prompt holds the answer before it: at most max_tokens more.
        extra = upstream_calls - 1
        admission = admission_admit(
            user_id=caller.user_id,
            key_id=caller.key_id,
            model=model,
            request_id=caller.request_id,
            prompt_tokens=prompt_tokens * upstream_calls + max_tokens * extra,
            max_tokens=max_tokens * upstream_calls,
            priority=caller.priority,
            gate=_gate_of(probe),
        )
    except QuotaExceeded as exc:
        if exc.looked_up:  # the admission looked the answer up: the copy it found, if any
            found = None
            if probe is not None and exc.entry is not None and _fallback_allowed(exc):
                found = cache_probe_stale(probe, exc.entry)
            stale = found.value if found is not None else None
        else:
            stale = _stale_for(exc, key, cache_policy)
        if stale is None:
            raise
        latency_ms = int((time.monotonic() - started) * 1000)
        return _fallback(
            stale, "redis", exc, caller=caller, policy=policy, model=model, latency_ms=latency_ms
        )
    if probe is not None and admission.cached:  # a fresh answer: counted as a hit
        hit, _ = cache_probe_found(probe, admission.entry, locked=False)
        assert hit is not None  # noqa: S101 - the script found it fresh
        return _hit_counted(hit, admission=admission, model=model)
    return admission, prompt_tokens


def _hit_counted(hit: CacheHit, *, admission: Admission, model: str) -> Outcome:
    """A cached answer whose request was counted: its (batched) ledger row, the answer."""
    usage_record_hit(admission=admission)
    return Outcome(
        value=hit.value,
        model=model,
        cache="HIT",
        cache_layer=hit.layer,
        headers=admission.headers(),
    )


def _serve_hit(hit: CacheHit, *, caller: Caller, policy: Policy, model: str) -> Outcome:
    """A cached answer: counted as one request, free."""
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
        return _fallback(
            hit.value, hit.layer, exc, caller=caller, policy=policy, model=model, latency_ms=0
        )
    return _hit_counted(hit, admission=admission, model=model)


def _fallback(
    value: dict[str, Any],
    layer: str,
    exc: QuotaExceeded,
    *,
    caller: Caller,
    policy: Policy,
    model: str,
    latency_ms: int,
) -> Outcome:
    """A stored answer served because a quota refused the request (`fallback: true`)."""
    usage_record_fallback(
        policy=policy,
        user_id=caller.user_id,
        key_id=caller.key_id,
        request_id=caller.request_id,
        latency_ms=latency_ms,
    )
    return Outcome(
        value=value,
        model=model,
        cache="STALE",
        cache_layer=layer,
        headers=exc.headers,
        fallback_code=exc.code,
    )


def _start_stream(
    request: CompletionRequest,
    *,
    admission: Admission,
    key: str,
    cache_policy: str,
    model: str,
    prompt_tokens: int,
    keep_alive: Callable[[], object] | None = None,
) -> Outcome:
    """Open the upstream stream (retried until its first piece) and wrap it in `_relay`.

    From here until the stream ends (read to its end, cut short upstream, or closed by the
    server) its reservation and lease are renewed on a thread (`renewal_start`), not by the
    relay: a client that stops reading blocks the relay's thread in send for as long as it
    likes, and the sweep must not take the stream for a dead worker's meanwhile."""
    try:
        pieces = upstream_stream(provider=admission.policy.provider, request=request)
    except GenerationError as err:
        return _upstream_failed(err, admission, key, cache_policy, model)
    except BaseException:
        usage_refund(admission=admission, outcome="upstream_error")
        raise
    outcome = Outcome(
        value={},
        model=model,
        cache="MISS" if cache_policy != "bypass" else "BYPASS",
        headers=admission.headers(),
    )
    renewal = renewal_start(admission=admission, keep_alive=keep_alive)
    relay = _relay(
        pieces,
        outcome=outcome,
        admission=admission,
        renewal=renewal,
        key=key,
        cache_policy=cache_policy,
        prompt_tokens=prompt_tokens,
    )
    # A response dropped unclosed and unstarted (never the server's way, but a middleware
    # may fail after the view) would otherwise renew its lease as long as the process
    # lives: its reservation is left to the sweep, as a dead worker's.
    weakref.finalize(relay, renewal.stop)

    def close() -> None:
        renewal.stop()  # the response ends: its request is settled here, if not already
        unstarted = inspect.getgeneratorstate(relay) == inspect.GEN_CREATED
        relay.close()  # a relay cut short settles what it sent; one at its end: nothing
        if unstarted:  # the client left before the first piece: it was sent nothing, but
            try:  # the provider has read the prompt
                _close_iterator(pieces)
            finally:
                usage_settle(admission=admission, prompt_tokens=prompt_tokens, completion_tokens=0)

    outcome.pieces, outcome.close = relay, close
    return outcome


def _close_iterator(pieces: Iterator[Any]) -> None:
    close = getattr(pieces, "close", None)
    if close is not None:
        close()


def _upstream_failed(
    err: GenerationError, admission: Admission, key: str, cache_policy: str, model: str
) -> Outcome:
    """Refund a failed upstream call; serve the stale copy when the provider is unavailable
    and the policy allows it, else raise `err` (with the rate-limit headers). The copy is
    looked up before the refund, whose ledger row records what the client got: the stale
    copy (a fallback, as a quota's), or the failure."""
    copy = None
    if (
        isinstance(err, UpstreamUnavailable)
        and cache_policy != "bypass"
        and admission.policy.allow_stale_fallback
    ):
        copy = cache_get_stale(key)
    usage_refund(admission=admission, outcome=err.outcome, fallback=copy is not None)
    err.headers = admission.headers()
    if copy is None:
        raise err
    return Outcome(
        value=copy.value,
        model=model,
        cache="STALE",
        cache_layer="redis",
        headers=err.headers,
        fallback_code=err.code,
    )


def _relay(
    pieces: Iterator[str | Completion],
    *,
    outcome: Outcome,
    admission: Admission,
    renewal: Renewal,
    key: str,
    cache_policy: str,
    prompt_tokens: int,
) -> Generator[str, None, None]:
    """Pass a stream's text on, then settle it and store the whole answer. A failure
    mid-stream (the provider's, or any other) is refunded and left in `outcome.error`. A
    client that goes away mid-stream pays the estimate of what it was sent (the provider
    has produced and billed it).
    `renewal` keeps the reservation and lease held meanwhile, however long the client takes
    to read; it is stopped for good once the last piece is passed on or the relay ends
    any other way."""
    sent: list[str] = []
    final: Completion | None = None
    try:
        for item in pieces:
            if isinstance(item, Completion):
                final = item
            else:
                sent.append(item)
                yield item
    except GenerationError as err:
        usage_refund(admission=admission, outcome=err.outcome)
        outcome.error = err
        return
    except GeneratorExit:
        usage_settle(
            admission=admission,
            prompt_tokens=prompt_tokens,
            completion_tokens=tokens_count("".join(sent)),
        )
        raise
    except Exception:
        # Anything else (an answer of a shape no provider maps, a mistake of ours) is
        # refunded at once, as it is before the stream begins, and its lease freed, rather
        # than left to the sweep; the client's stream ends as a cut one does, with the
        # generic 500's error, instead of breaking off as if the answer were whole.
        logger.exception("stream %s broke off", admission.request_id)
        usage_refund(admission=admission, outcome="upstream_error")
        outcome.error = GenerationError(
            "An unexpected error occurred.", code="internal_error", status=500
        )
        return
    except BaseException:
        # The worker told to stop (SystemExit, KeyboardInterrupt) mid-stream: refunded
        # too, not left holding its lease until the sweep takes the worker for dead.
        usage_refund(admission=admission, outcome="upstream_error")
        raise
    finally:
        renewal.stop()  # nothing is passed on past here: no client can hold the stream up
        _close_iterator(pieces)
    if final is None:
        usage_refund(admission=admission, outcome="upstream_error")
        outcome.error = UpstreamError("The model provider's stream ended without an answer.")
        return
    outcome.value = _completion_value(final)
    outcome.prompt_tokens, outcome.completion_tokens = final.prompt_tokens, final.completion_tokens
    # The answer's store rides in the settlement's round trip.
    pending = cache_store_later(key, outcome.value) if cache_policy != "bypass" else None
    try:
        outcome.cost = usage_settle(
            admission=admission,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            riders=pending.calls if pending is not None else (),
        )
    finally:
        if pending is not None:
            pending.finish()


def _fallback_allowed(exc: QuotaExceeded) -> bool:
    policy = getattr(exc, "policy", None)
    return policy is not None and bool(policy.allow_stale_fallback)


def _stale_for(exc: QuotaExceeded, key: str, cache_policy: str) -> dict[str, Any] | None:
    if cache_policy == "bypass" or not _fallback_allowed(exc):
        return None
    stale = cache_get_stale(key)
    return stale.value if stale is not None else None


def _gate_of(probe: CacheProbe | None) -> CacheGate | None:
    """The admission's share of a cache look-up (one round trip for both)."""
    if probe is None:
        return None
    return CacheGate(
        entry=probe.entry_key, lock=probe.lock.key, token=probe.lock.token, lock_ms=probe.lock_ms
    )


# --- /api/v1/generate and /v1/chat/completions ---------------------------------------------


def completion_create(
    *,
    caller: Caller,
    model: str | None,
    messages: list[dict[str, str]],
    max_tokens: int | None,
    temperature: float | None,
    cache_policy: str = "use",
    stream: bool = False,
    prompt_field: str = "messages",
    max_tokens_field: str = "max_tokens",
    keep_alive: Callable[[], object] | None = None,
) -> Outcome:
    """A chat completion (`prompt` requests arrive here as one user message, and name
    `prompt` as their `prompt_field`; `max_tokens_field` is the field the client bounded
    the answer with; `keep_alive`: see `generation_run`)."""
    return generation_run(
        caller=caller,
        model=model or settings.TOLLGATE_DEFAULT_MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        cache_policy=cache_policy,
        stream=stream,
        prompt_field=prompt_field,
        max_tokens_field=max_tokens_field,
        keep_alive=keep_alive,
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

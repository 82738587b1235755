"""Settlement: the reservation replaced by actual usage, or refunded; idempotent."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from decimal import Decimal

from config.redis_calls import ScriptCall
from health import metrics
from quotas.engine import (
    BackendUnavailable,
)
from quotas.models import Outcome
from quotas.policy import usd_to_micros
from quotas.services.admission import Admission
from quotas.services.ledger import _latency, _ledger_write
from quotas.services.state import _state, backend, logger, settlement_defer

# --- settlement --------------------------------------------------------------------------


def _settle_counters(
    *,
    admission: Admission,
    tokens: int,
    cost: int,
    refund: bool,
    riders: Sequence[ScriptCall] = (),
    ledger: Callable[[], None],
) -> None:
    """The counters' settlement, with `ledger` (the request's ledger write) run while its
    Redis round trip is out: the two round trips overlap (`run_calls`)."""
    if admission.backend == "degraded":
        _state.fallback.settle(
            request_id=admission.request_id, tokens=tokens, cost=cost, refund=refund
        )
        # The riders stay with their owner, which sends them unless Redis is away (in
        # fail-open it often is) and tells its outage how they went (PendingStore.finish).
        ledger()
        return
    try:
        backend().settle(
            request_id=admission.request_id,
            tokens=tokens,
            cost=cost,
            refund=refund,
            riders=riders,
            meanwhile=ledger,
        )
    except BackendUnavailable:
        # Sent again before this worker's next admission that reaches Redis: its lease is
        # freed and its actual usage counted then. Should the worker stop first, the sweep
        # refunds the reservation when its lease expires; the ledger row holds the cost.
        logger.warning("settlement of %s deferred: quota backend unavailable", admission.request_id)
        settlement_defer(request_id=admission.request_id, tokens=tokens, cost=cost, refund=refund)


def usage_renew(*, admission: Admission) -> bool:
    """A request still running (a long stream) keeps what it reserved, its concurrency
    lease included, for another QUOTA_LEASE_TTL: the sweep refunds only what a dead worker
    left. Returns False when there is nothing left to renew (settled, swept, or lost with a
    restarted Redis). Raises BackendUnavailable when Redis could not take it. Streams call
    it through `renewal_start`, off the request's thread."""
    be = _state.fallback if admission.backend == "degraded" else backend()
    return be.renew(request_id=admission.request_id, now=time.time())


def usage_settle(
    *,
    admission: Admission,
    prompt_tokens: int,
    completion_tokens: int,
    latency_ms: int | None = None,
    cached: bool = False,
    fallback: bool = False,
    riders: Sequence[ScriptCall] = (),
) -> Decimal:
    """Replace the reservation by the actual usage and write the ledger row; idempotent.

    Returns the cost in USD (Decimal, to the micro-dollar). `cached=True` with zero tokens
    settles a request answered by another one (single flight): it counts as a request and
    costs nothing. `riders`: other services' Redis script calls sent in the settlement's
    round trip (the cache store of the answer); each holds its own reply or error after.
    They are not sent when the settlement does not go to Redis (fail-open, or Redis away):
    their owner sends them, or not (caching's `PendingStore.finish`).
    """
    policy = admission.policy
    cost = policy.cost_of(prompt_tokens, completion_tokens)
    micros = usd_to_micros(cost)
    tokens = prompt_tokens + completion_tokens
    latency = _latency(admission, latency_ms)
    _settle_counters(
        admission=admission,
        tokens=tokens,
        cost=micros,
        refund=False,
        riders=riders,
        ledger=lambda: _ledger_write(
            admission=admission,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost,
            outcome=Outcome.CACHED if cached else Outcome.OK,
            cached=cached,
            fallback=fallback,
            latency_ms=latency,
        ),
    )
    admission.settled_tokens = tokens
    if tokens:
        metrics.series(metrics.TOKENS, policy.model, "prompt").inc(prompt_tokens)
        metrics.series(metrics.TOKENS, policy.model, "completion").inc(completion_tokens)
    if cost:
        metrics.series(metrics.COST_USD, policy.model).inc(float(cost))
    return cost


def usage_refund(
    *, admission: Admission, outcome: str, latency_ms: int | None = None, fallback: bool = False
) -> None:
    """A failed upstream call: everything reserved is given back; the ledger row has no cost.

    `fallback=True`: the failure (the provider unavailable) was answered with a stale cached
    copy. The row then records what was served, as a quota's fallback row does (cached,
    fallback, outcome `cached`, not `outcome`), and a stale fallback is counted. Like a
    refused request's, it is no request in the counters (the refund takes the request back)
    nor in the ledger's sums (fallback rows are left out), so both still agree.
    """
    latency = _latency(admission, latency_ms)
    if fallback:
        outcome = Outcome.CACHED
    _settle_counters(
        admission=admission,
        tokens=0,
        cost=0,
        refund=True,
        ledger=lambda: _ledger_write(
            admission=admission,
            prompt_tokens=0,
            completion_tokens=0,
            cost=Decimal(0),
            outcome=outcome,
            cached=fallback,
            fallback=fallback,
            latency_ms=latency,
        ),
    )
    admission.settled_tokens = 0
    if fallback:
        metrics.STALE_FALLBACKS.inc()

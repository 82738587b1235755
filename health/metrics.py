"""Tollgate's own Prometheus metrics. Labels are bounded: no user, key or request ids."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "tollgate_requests_total",
    "API requests by endpoint, status and cache result.",
    ["endpoint", "status", "cache"],
)
QUOTA_DECISIONS = Counter(
    "tollgate_quota_decisions_total",
    "Admission decisions by scope and dimension.",
    ["decision", "scope", "dimension"],
)
QUOTA_BACKEND_FALLBACKS = Counter(
    "tollgate_quota_backend_fallbacks_total",
    "Admissions decided without Redis (fail-open) or refused for its absence (fail-closed).",
    ["mode"],
)
STALE_FALLBACKS = Counter(
    "tollgate_stale_fallbacks_total",
    "Stale cached answers served because a quota was exhausted or the provider unavailable.",
)
CACHE_OPERATIONS = Counter(
    "tollgate_cache_operations_total",
    "Cache look-ups and writes by layer and result.",
    ["layer", "result"],
)
UPSTREAM_CALLS = Counter(
    "tollgate_upstream_calls_total",
    "Upstream calls by provider, model and outcome.",
    ["provider", "model", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "tollgate_upstream_latency_seconds",
    "Upstream call latency.",
    ["provider", "model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
LEDGER_SPOOL_ROWS = Counter(
    "tollgate_ledger_spool_rows_total",
    "Ledger rows PostgreSQL could not take, by event: kept (put in the spool) or written.",
    ["event"],
)
TOKENS = Counter("tollgate_tokens_total", "Tokens charged by model and kind.", ["model", "kind"])
COST_USD = Counter("tollgate_cost_usd_total", "USD charged by model.", ["model"])
# Under gunicorn each worker sets these from what it last saw; the most recent value of a
# live worker is the truth (a max or min would keep a state another worker has since left).
CIRCUIT_STATE = Gauge(
    "tollgate_circuit_state",
    "Circuit breaker state (0 closed, 1 half-open, 2 open).",
    ["provider", "model"],
    multiprocess_mode="livemostrecent",
)
QUOTA_REMAINING = Gauge(
    "tollgate_quota_remaining",
    "Remaining headroom of global and provider scopes (provider and model empty for global;"
    " model * for all of a provider's models).",
    # Each ProviderQuota row is a scope of its own: without provider and model, every row
    # with the same dimension wrote one series, the last read hiding the others.
    ["scope", "dimension", "provider", "model"],
    multiprocess_mode="livemostrecent",
)
# Saturation: a gthread worker holds as many requests as it has threads (gunicorn.conf.py),
# and with a provider answering in seconds that, not the CPU, is what runs out first. A
# stream is held until its last event. Summed over the live workers.
REQUESTS_IN_FLIGHT = Gauge(
    "tollgate_http_requests_in_flight",
    "Requests being served (a stream until its end).",
    multiprocess_mode="livesum",
)
REQUEST_SLOTS = Gauge(
    "tollgate_http_request_slots",
    "Requests the serving workers can hold at once (their threads).",
    multiprocess_mode="livesum",
)


_series: dict[tuple[Any, ...], Any] = {}


def series(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once per process.

    prometheus_client checks and joins the label values again at every `labels()` call, and
    a cache miss updates seven labelled series of this module. `labels()` hands back the
    same child for the same values as long as it is not removed, and no code removes one
    (no `remove()` or `clear()`); the values are bounded (see above), so is the dict."""
    key = (metric, *values)
    child = _series.get(key)
    if child is None:
        child = _series[key] = metric.labels(*values)
    return child

"""Upstream resilience: timeouts, retries (tenacity) and a circuit breaker shared through
Redis.

Retries: exponential backoff with full jitter (`random(0, min(max, base * 2**n))`, AWS's
"full jitter"), except when the provider sent Retry-After, which is then waited instead.
Attempts are bounded by UPSTREAM_MAX_ATTEMPTS and the whole call by
UPSTREAM_MAX_RETRY_SECONDS, or UPSTREAM_READ_TIMEOUT if that is longer (a first attempt
always has its whole read timeout: a generation that takes 45 s is not cut at a 30 s retry
budget): no attempt starts, and no sleep begins, that would end past that bound, and each
attempt's read timeout is cut to the time left. Except a stream's: the SDKs' HTTP client
applies an attempt's read timeout to every read of its answer, so a stream attempt reads
with the whole UPSTREAM_READ_TIMEOUT, lest an answer under way be cut between two pieces by
what was left of the budget when it began (its first piece may come that much past it).

Circuit breaker: one Redis hash per provider+model (`<prefix>:cb:<provider>:<model>`), so
every worker sees the same state. CIRCUIT_FAILURE_THRESHOLD consecutive failed attempts
(timeouts, connection errors, 5xx, malformed answers; not 429 nor other 4xx) open it; while
open every call fails at once with 503. After CIRCUIT_RESET_SECONDS it is half-open: one
caller at a time (a lease in Redis) gets through as a probe; its success closes the
circuit, its failure opens it again for another period. Each transition is one Lua call.
A worker that finds a circuit closed without failures trusts that for
CIRCUIT_CLOSED_CACHE_SECONDS (0.25 s) without asking Redis again, so a healthy provider
costs at most four checks a second per worker, and a circuit opened by another worker is
seen within that bound; the worker's own failures are always counted in Redis at once.

Without REDIS_URL (the embedded default) the same state machine lives in the process. If
Redis is unreachable the breaker steps aside (calls go through, failures are not counted)
rather than turning an outage of Redis into an outage of the gateway; it leaves Redis alone
while any part of the worker finds it away (its server's Outage, config.outages).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tenacity
from django.conf import settings
from django_redis import get_redis_connection

from config.outages import REDIS_DOWN, Outage, OutageNotice, redis_outage
from generation.errors import (
    GenerationError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from generation.providers import provider_get
from generation.providers.base import (
    Completion,
    CompletionRequest,
    ProviderBrokeOff,
    ProviderFailure,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnreachable,
)
from health.metrics import CIRCUIT_STATE, UPSTREAM_CALLS, UPSTREAM_LATENCY, series

logger = logging.getLogger("tollgate.generation")

STATE_CODES = {"closed": 0, "half_open": 1, "open": 2}

# KEYS: breaker hash, probe lease. ARGV: now, reset seconds, probe lease ms.
# Returns {allowed 0/1, state, failures, seconds until a probe may go}.
_ALLOW = """
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at')
local state = h[1] or 'closed'
local failures = tonumber(h[2] or '0')
if state == 'closed' then return {1, state, failures, '0'} end
local now = tonumber(ARGV[1])
if state == 'open' then
  local waited = now - tonumber(h[3] or '0')
  local reset = tonumber(ARGV[2])
  if waited < reset then return {0, state, failures, tostring(reset - waited)} end
  redis.call('HSET', KEYS[1], 'state', 'half_open')
  state = 'half_open'
end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then
  return {1, state, failures, '0'}
end
return {0, state, failures, '1'}
"""

# KEYS: breaker hash, probe lease. ARGV: now, threshold, seconds a failure is remembered.
# Returns the state after the failure.
_FAILURE = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'open' then return state end
if state == 'half_open' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1])
  redis.call('PERSIST', KEYS[1])
  redis.call('DEL', KEYS[2])
  return 'open'
end
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if n >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1])
  redis.call('PERSIST', KEYS[1])
  return 'open'
end
redis.call('HSET', KEYS[1], 'state', 'closed')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 'closed'
"""

# KEYS: breaker hash, probe lease. A success closes a half-open circuit and clears the
# failure count; it does not close a circuit another worker opened meanwhile.
_SUCCESS = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' then return state end
redis.call('DEL', KEYS[1], KEYS[2])
return 'closed'
"""


class _LocalCircuits:
    """The breaker's state machine in one process, for the embedded default (no Redis)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: dict[str, dict[str, Any]] = {}
        self.probes: dict[str, float] = {}

    def allow(self, key: str, probe_key: str, now: float, reset: float, probe_ms: int) -> list[Any]:
        with self.lock:
            h = self.state.get(key, {})
            state, failures = h.get("state", "closed"), int(h.get("failures", 0))
            if state == "closed":
                return [1, state, failures, "0"]
            if state == "open":
                waited = now - float(h.get("opened_at", 0))
                if waited < reset:
                    return [0, state, failures, str(reset - waited)]
                h["state"] = state = "half_open"
            if self.probes.get(probe_key, 0) <= time.monotonic():
                self.probes[probe_key] = time.monotonic() + probe_ms / 1000
                return [1, state, failures, "0"]
            return [0, state, failures, "1"]

    def failure(self, key: str, probe_key: str, now: float, threshold: int) -> str:
        with self.lock:
            h = self.state.setdefault(key, {})
            state = h.get("state", "closed")
            if state == "open":
                return str(state)
            if state == "half_open":
                h.update(state="open", opened_at=now)
                self.probes.pop(probe_key, None)
                return "open"
            h["failures"] = int(h.get("failures", 0)) + 1
            if h["failures"] >= threshold:
                h.update(state="open", opened_at=now)
                return "open"
            h["state"] = "closed"
            return "closed"

    def success(self, key: str, probe_key: str) -> str:
        with self.lock:
            if self.state.get(key, {}).get("state") == "open":
                return "open"
            self.state.pop(key, None)
            self.probes.pop(probe_key, None)
            return "closed"

    def release(self, probe_key: str) -> None:
        with self.lock:
            self.probes.pop(probe_key, None)


_local = _LocalCircuits()
_scripts: dict[str, Any] = {}
# The state last reported to the CIRCUIT_STATE gauge, per provider+model: in Prometheus
# multiprocess mode every set is a write to a shared file, so only changes are written.
_reported: dict[tuple[str, str], int] = {}
# Breaker key -> time.monotonic() until which a closed circuit without failures is trusted.
_closed_until: dict[str, float] = {}
# While Redis is away (this breaker or any other part of the worker found it so), calls go
# through as if the circuit were closed and Redis is left alone until its check finds it back:
# a Redis that hangs would otherwise cost every call a socket timeout, twice (before and
# after it).
_redis_away = OutageNotice(
    logger,
    began="circuit state unavailable (Redis down): calls go through as if closed until "
    "Redis answers again",
    ended="circuit state available again after %.1f s",
)


def _outage() -> Outage:
    """The shared Outage of the Redis server that holds the circuits."""
    return redis_outage(get_redis_connection("default"))


def _report(provider: str, model: str, state: str) -> None:
    code = STATE_CODES.get(state, 0)
    if _reported.get((provider, model)) != code:
        _reported[(provider, model)] = code
        CIRCUIT_STATE.labels(provider, model).set(code)


def _script(name: str, source: str) -> Any:
    script = _scripts.get(name)
    if script is None:
        script = get_redis_connection("default").register_script(source)
        _scripts[name] = script
    return script


def _now(now: float | None) -> float:
    return now if now is not None else time.time()


class CircuitOpen(Exception):  # noqa: N818 - a state, raised to stop the call
    """The circuit of this provider+model refuses calls for `retry_after` seconds."""

    def __init__(self, *, provider: str, model: str, retry_after: float) -> None:
        super().__init__(f"circuit open for {provider}:{model}")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Breaker:
    """The shared circuit of one provider+model."""

    provider: str
    model: str

    @property
    def key(self) -> str:
        return f"{settings.REDIS_KEY_PREFIX}:cb:{self.provider}:{self.model}"

    @property
    def probe_key(self) -> str:
        return f"{settings.REDIS_KEY_PREFIX}:cbprobe:{self.provider}:{self.model}"

    def allow(self, *, now: float | None = None) -> tuple[str, int]:
        """Admit one attempt: (state, failures so far). Raises CircuitOpen."""
        probe_ms = int(
            1000 * (settings.UPSTREAM_READ_TIMEOUT + settings.UPSTREAM_CONNECT_TIMEOUT + 1)
        )
        if not settings.REDIS_URL:
            reply = _local.allow(
                self.key, self.probe_key, _now(now), settings.CIRCUIT_RESET_SECONDS, probe_ms
            )
        elif _closed_until.get(self.key, 0.0) > time.monotonic() or _redis_away.away(
            outage := _outage()
        ):
            return "closed", 0
        else:
            try:
                reply = _script("allow", _ALLOW)(
                    keys=[self.key, self.probe_key],
                    args=[_now(now), settings.CIRCUIT_RESET_SECONDS, probe_ms],
                )
            except REDIS_DOWN as exc:
                _redis_away.failed(outage, exc)
                return "closed", 0
            _redis_away.answered(outage)
        allowed, state, failures, wait = reply
        state = state.decode() if isinstance(state, bytes) else str(state)
        _report(self.provider, self.model, state)
        if not allowed:
            raise CircuitOpen(provider=self.provider, model=self.model, retry_after=float(wait))
        if settings.REDIS_URL and state == "closed" and not int(failures):
            _closed_until[self.key] = time.monotonic() + settings.CIRCUIT_CLOSED_CACHE_SECONDS
        return state, int(failures)

    def record_failure(self, *, now: float | None = None) -> str:
        """Count one failed attempt; returns the new state."""
        _closed_until.pop(self.key, None)
        remember = max(60, int(settings.CIRCUIT_RESET_SECONDS * 2))
        if not settings.REDIS_URL:
            state = _local.failure(
                self.key, self.probe_key, _now(now), settings.CIRCUIT_FAILURE_THRESHOLD
            )
        elif _redis_away.away(outage := _outage()):
            return "closed"
        else:
            try:
                state = _script("failure", _FAILURE)(
                    keys=[self.key, self.probe_key],
                    args=[_now(now), settings.CIRCUIT_FAILURE_THRESHOLD, remember],
                )
            except REDIS_DOWN as exc:
                _redis_away.failed(outage, exc)
                return "closed"
            _redis_away.answered(outage)
        state = state.decode() if isinstance(state, bytes) else str(state)
        if state == "open":
            logger.warning("circuit open: %s:%s", self.provider, self.model)
        _report(self.provider, self.model, state)
        return state

    def release_probe(self) -> None:
        """Let another caller probe a half-open circuit (this probe proved nothing)."""
        if not settings.REDIS_URL:
            _local.release(self.probe_key)
            return
        if _redis_away.away(outage := _outage()):
            return  # the lease expires by itself
        try:
            get_redis_connection("default").delete(self.probe_key)
        except REDIS_DOWN as exc:
            _redis_away.failed(outage, exc)
            logger.warning("probe lease not released (Redis down); it expires by itself")
            return
        _redis_away.answered(outage)

    def record_success(self) -> None:
        """Close a half-open circuit / forget earlier failures."""
        if not settings.REDIS_URL:
            _local.success(self.key, self.probe_key)
        elif _redis_away.away(outage := _outage()):
            return
        else:
            try:
                _script("success", _SUCCESS)(keys=[self.key, self.probe_key], args=[])
            except REDIS_DOWN as exc:
                _redis_away.failed(outage, exc)
                return
            _redis_away.answered(outage)
        _report(self.provider, self.model, "closed")


def circuit_states(*, now: float | None = None) -> list[dict[str, Any]]:
    """Every circuit Redis knows of (closed circuits without recent failures are absent):
    [{"provider", "model", "state", "failures", "retry_in"}], sorted by provider+model.
    `retry_in` is the seconds until an open circuit lets a probe through (0 otherwise)."""
    return _circuit_rows(_now(now)) or []


def circuit_gauges_refresh() -> None:
    """Set tollgate_circuit_state of every circuit from Redis (a scrape).

    Every state is written, not only changes: under gunicorn the most recent write of a
    live worker wins, and a state this worker said before may have been overwritten since.
    A circuit this worker has reported that Redis no longer holds is closed (a success
    deletes its hash; so does a Redis that lost its data): it is written 0, or the gauge
    would show it open until this worker next calls that model. Redis away: nothing is
    written, the last states stand."""
    rows = _circuit_rows(time.time())
    if rows is None:
        return
    states = {(row["provider"], row["model"]): str(row["state"]) for row in rows}
    for provider, model in list(_reported):
        states.setdefault((provider, model), "closed")
    for (provider, model), state in states.items():
        code = STATE_CODES.get(state.replace("-", "_"), 0)
        _reported[(provider, model)] = code
        CIRCUIT_STATE.labels(provider, model).set(code)


def _circuit_rows(now: float) -> list[dict[str, Any]] | None:
    """The rows of circuit_states(); None when Redis cannot be read."""
    prefix = f"{settings.REDIS_KEY_PREFIX}:cb:"
    hashes = _circuit_hashes(prefix)
    if hashes is None:
        return None
    rows = []
    for key, data in hashes:
        if not data:
            continue
        provider, _, model = key[len(prefix) :].partition(":")
        state = data.get("state", "closed")
        retry_in = 0.0
        if state == "open":
            retry_in = max(
                0.0, settings.CIRCUIT_RESET_SECONDS - (now - float(data.get("opened_at", now)))
            )
        rows.append(
            {
                "provider": provider,
                "model": model,
                "state": state,
                "failures": int(data.get("failures", 0)),
                "retry_in": round(retry_in, 3),
            }
        )
    return sorted(rows, key=lambda r: (r["provider"], r["model"]))


def _circuit_hashes(prefix: str) -> list[tuple[str, dict[str, Any]]] | None:
    """(key, fields) of every breaker hash; None when Redis is away or stops answering."""
    if not settings.REDIS_URL:
        with _local.lock:
            return [(k, {n: str(v) for n, v in h.items()}) for k, h in _local.state.items()]
    conn = get_redis_connection("default")
    outage = redis_outage(conn)
    if outage.away():
        logger.warning("circuit states unavailable (Redis down)")
        return None
    hashes = []
    try:
        for raw in conn.scan_iter(match=prefix + "*", count=500):
            key = raw.decode() if isinstance(raw, bytes) else raw
            hashes.append(
                (
                    key,
                    {
                        (k.decode() if isinstance(k, bytes) else k): (
                            v.decode() if isinstance(v, bytes) else v
                        )
                        for k, v in conn.hgetall(key).items()
                    },
                )
            )
    except REDIS_DOWN as exc:
        outage.failed(exc)
        logger.warning("circuit states unavailable (Redis down)")
        return None
    outage.answered()
    return hashes


class _WaitRetryAfterOrJitter(tenacity.wait.wait_base):
    """Full-jitter exponential backoff, or the provider's Retry-After when it sent one."""

    def __init__(self, *, base: float, maximum: float) -> None:
        self.jitter = tenacity.wait_random_exponential(multiplier=base, max=maximum)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(retry_after)
        return float(self.jitter(retry_state))


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderFailure) and exc.retryable


_retryings: dict[tuple[Any, ...], tenacity.Retrying] = {}


def _call_seconds() -> float:
    """How long one upstream call may take, its retries included (see the module's
    docstring): the retry budget, but never less than one attempt's read timeout."""
    return max(settings.UPSTREAM_MAX_RETRY_SECONDS, settings.UPSTREAM_READ_TIMEOUT)


def _retrying() -> tenacity.Retrying:
    """The retry policy of the settings of the moment, built once per set of values: a
    Retrying keeps the state of a call per thread, so one serves every call."""
    values = (
        settings.UPSTREAM_MAX_ATTEMPTS,
        _call_seconds(),
        settings.UPSTREAM_BACKOFF_BASE,
        settings.UPSTREAM_BACKOFF_MAX,
    )
    retrying = _retryings.get(values)
    if retrying is None:
        attempts, seconds, base, maximum = values
        retrying = _retryings[values] = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_before_delay(seconds),
            wait=_WaitRetryAfterOrJitter(base=base, maximum=maximum),
            retry=tenacity.retry_if_exception(_retryable),
            reraise=True,
        )
    return retrying


def _api_error(exc: Exception) -> GenerationError:
    """The contract's error for a final upstream failure."""
    if isinstance(exc, CircuitOpen):
        return UpstreamUnavailable(
            "The model provider is failing; its circuit is open.", retry_after=exc.retry_after
        )
    if isinstance(exc, ProviderTimeout):
        return UpstreamTimeout()
    if isinstance(exc, ProviderRateLimited | ProviderUnreachable):
        return UpstreamUnavailable(retry_after=exc.retry_after)
    if isinstance(exc, ProviderBrokeOff):
        return UpstreamError("The model provider's answer broke off.")
    return UpstreamError()


class _Attempts:
    """One upstream call's attempts: breaker check, read timeout (cut to the time left),
    metrics, and the breaker's bookkeeping of each outcome."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.breaker = Breaker(provider, model)
        self.deadline = time.monotonic() + _call_seconds()
        self.state = "closed"
        self.failures = 0
        self.started = 0.0

    def begin(self, *, stream: bool = False) -> float:
        """Admit an attempt (raises CircuitOpen); returns its read timeout: the time left
        in the budget, at most UPSTREAM_READ_TIMEOUT. A stream's is the whole read timeout:
        the SDKs' HTTP client applies one read timeout to every read of a response, and a
        stream begun late in the budget would otherwise be cut between two pieces of an
        answer under way (never retried) by what was left of the budget when it began.
        Its first piece may so come up to a read timeout past the budget."""
        self.state, self.failures = self.breaker.allow()
        self.started = time.perf_counter()
        if stream:
            return float(settings.UPSTREAM_READ_TIMEOUT)
        return max(0.05, min(settings.UPSTREAM_READ_TIMEOUT, self.deadline - time.monotonic()))

    def failed(self, exc: ProviderFailure) -> None:
        UPSTREAM_CALLS.labels(self.provider, self.model, exc.outcome).inc()
        if exc.trips_circuit:
            self.breaker.record_failure()
        elif self.state == "half_open":
            self.breaker.release_probe()
        logger.info("upstream attempt failed: %s", exc)

    def succeeded(self) -> None:
        series(UPSTREAM_LATENCY, self.provider, self.model).observe(
            time.perf_counter() - self.started
        )
        series(UPSTREAM_CALLS, self.provider, self.model, "ok").inc()
        if self.state != "closed" or self.failures:
            self.breaker.record_success()

    def abandoned(self) -> None:
        """The attempt ended neither way (its stream closed early, or an error of ours):
        a half-open circuit's probe is given back for the next request to take."""
        if self.state == "half_open":
            self.breaker.release_probe()


def upstream_complete(*, provider: str, request: CompletionRequest) -> Completion:
    """Complete `request` on `provider` with timeouts, retries and the circuit breaker.

    Raises UpstreamTimeout (504), UpstreamUnavailable (503: circuit open, provider
    unreachable or rate-limiting) or UpstreamError (502); their `.outcome` is the ledger
    outcome of the refund.
    """
    client = provider_get(provider)
    attempts = _Attempts(provider, request.model)

    def attempt() -> Completion:
        timeout = attempts.begin()
        try:
            result = client.complete(request, timeout=timeout)
        except ProviderFailure as exc:
            attempts.failed(exc)
            raise
        except BaseException:
            attempts.abandoned()
            raise
        attempts.succeeded()
        return result

    try:
        return _retrying()(attempt)
    except (CircuitOpen, ProviderFailure) as exc:
        raise _api_error(exc) from exc


def upstream_stream(*, provider: str, request: CompletionRequest) -> Iterator[str | Completion]:
    """Stream `request` from `provider`: text pieces, then the final Completion (usage).

    Attempts are retried, as in upstream_complete, until the first piece arrives; this
    function returns only then, so a failure to start raises the same 502/503/504 errors.
    A failure after that is raised by the iterator as one of those errors (never retried:
    part of the answer is already out): a dropped connection is then UpstreamError (502, the
    answer broke off), never UpstreamUnavailable.
    """
    client = provider_get(provider)
    attempts = _Attempts(provider, request.model)

    def attempt() -> tuple[Iterator[str | Completion], str | Completion]:
        timeout = attempts.begin(stream=True)
        try:
            pieces = iter(client.stream(request, timeout=timeout))
            return pieces, next(pieces)
        except StopIteration as exc:
            failure = ProviderServerError("empty stream")
            attempts.failed(failure)
            raise failure from exc
        except ProviderFailure as exc:
            attempts.failed(exc)
            raise

    try:
        pieces, first = _retrying()(attempt)
    except (CircuitOpen, ProviderFailure) as exc:
        raise _api_error(exc) from exc

    return _StartedStream(first, pieces, attempts)


class _StartedStream(Iterator[str | Completion]):
    """A stream whose first piece has arrived: that piece, then the rest. Its end is the
    attempt's outcome for the breaker; `close()` before the end (the client went away)
    closes the provider's stream and gives a half-open circuit's probe back, even when
    nothing was read from it yet."""

    def __init__(
        self, first: str | Completion, pieces: Iterator[str | Completion], attempts: _Attempts
    ) -> None:
        self._first: list[str | Completion] = [first]
        self._pieces = pieces
        self._attempts = attempts
        self._over = False

    def __next__(self) -> str | Completion:
        if self._first:
            return self._first.pop()
        if self._over:
            raise StopIteration
        try:
            return next(self._pieces)
        except StopIteration:
            self._over = True
            self._attempts.succeeded()
            raise
        except ProviderFailure as exc:
            self._over = True
            failure: ProviderFailure = exc
            if isinstance(exc, ProviderUnreachable):
                # Part of the answer came: the provider was reached, and the connection it
                # dropped is an answer broken off (502), not a provider down (503).
                failure = ProviderBrokeOff(f"{exc} (after the stream began)")
            self._attempts.failed(failure)
            raise _api_error(failure) from exc

    def close(self) -> None:
        if self._over:
            return
        self._over = True
        self._first.clear()
        try:
            if hasattr(self._pieces, "close"):  # a provider's generator
                self._pieces.close()
        finally:
            self._attempts.abandoned()

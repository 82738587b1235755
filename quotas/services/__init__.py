"""Quota services: admission, settlement, refunds, the ledger, keys and live policy.

The hot path is two calls: `admission_admit` (one Redis round trip: every window of every
scope checked and reserved all or nothing) and `usage_settle` (one Redis round trip and one
ledger INSERT). Policies are cached in the process and validated by the admission script
itself: it compares the caller's policy version with the live one and answers "stale"
instead of admitting, so a change saved anywhere holds on the very next admission of every
worker, at no extra round trip. The cache tier's look-up of a miss rides in the
admission's round trip (`CacheGate`), and its store in the settlement's
(`usage_settle(riders=...)`).

If Redis is unreachable, QUOTA_FAIL_MODE decides: `closed` refuses with 503
quota_unavailable; `open` admits through an in-process limiter for request windows and
concurrency (limits divided by QUOTA_WORKER_COUNT) and checks every token and cost budget,
and the calendar request windows, against the ledger under a PostgreSQL advisory lock per
principal: nothing fails open on money. When Redis answers again the counter epoch is
rotated so that day and month counters are rebuilt from the ledger, which holds what was
spent meanwhile.
"""

from quotas.engine import CacheGate
from quotas.policy import models_allowed
from quotas.services.admission import (
    Admission,
    admission_admit,
    admission_count_hit,
    ratelimit_headers,
)
from quotas.services.apikeys import key_create, key_extend, key_revoke, key_touch, new_request_id
from quotas.services.counters import (
    counters_rebuild,
    counters_rebuild_all,
    denials_persist,
    quota_reset_windows,
    reservations_sweep,
)
from quotas.services.ledger import (
    ledger_usage,
    usage_flush,
    usage_record_fallback,
    usage_record_hit,
)
from quotas.services.renewal import Renewal, renewal_start
from quotas.services.settlement import usage_refund, usage_renew, usage_settle
from quotas.services.standing import quota_global, quota_headers, quota_standing
from quotas.services.state import (
    QuotaBackend,
    backend,
    catalogue_providers,
    local_state_reset,
    policy_bump,
    policy_get,
)

__all__ = [
    "Admission",
    "CacheGate",
    "QuotaBackend",
    "Renewal",
    "admission_admit",
    "admission_count_hit",
    "backend",
    "counters_rebuild",
    "counters_rebuild_all",
    "denials_persist",
    "key_create",
    "key_extend",
    "key_revoke",
    "key_touch",
    "ledger_usage",
    "local_state_reset",
    "models_allowed",
    "new_request_id",
    "policy_bump",
    "catalogue_providers",
    "policy_get",
    "quota_global",
    "quota_headers",
    "quota_reset_windows",
    "quota_standing",
    "ratelimit_headers",
    "renewal_start",
    "reservations_sweep",
    "usage_flush",
    "usage_record_fallback",
    "usage_record_hit",
    "usage_refund",
    "usage_renew",
    "usage_settle",
]

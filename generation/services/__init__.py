"""Generation services: the request path (completion), Idempotency-Key handling
(idempotency) and the topic endpoints (topic_answers). Import from here."""

from generation.services.completion import (
    ZERO,
    Caller,
    Outcome,
    circuit_gauges_refresh,
    circuit_states,
    completion_body,
    completion_create,
    generation_run,
    money,
)
from generation.services.idempotency import (
    IdempotencyClaim,
    Replay,
    idempotency_begin,
    idempotency_finish,
    idempotent_run,
    request_fingerprint,
)
from generation.services.topic_answers import (
    SUBTOPICS_UPSTREAM_CALLS,
    ExplanationItem,
    _explain_one,
    explanation_cache_key,
    explanations_body,
    explanations_headers,
    explanations_rounds,
    subtopics_body,
    subtopics_cache_key,
    topic_explanations,
    topic_subtopics,
)

__all__ = [
    "ZERO",
    "Caller",
    "SUBTOPICS_UPSTREAM_CALLS",
    "ExplanationItem",
    "IdempotencyClaim",
    "Outcome",
    "Replay",
    "_explain_one",  # one explanation item, for the batch jobs of generation.jobs
    "circuit_gauges_refresh",
    "circuit_states",
    "explanation_cache_key",
    "completion_body",
    "completion_create",
    "explanations_body",
    "explanations_headers",
    "generation_run",
    "idempotency_begin",
    "idempotency_finish",
    "idempotent_run",
    "money",
    "request_fingerprint",
    "subtopics_body",
    "subtopics_cache_key",
    "explanations_rounds",
    "topic_explanations",
    "topic_subtopics",
]

"""Structured logging and error reporting.

Every log line is one JSON object (structlog, rendered through the standard library so that
Django's, Celery's and gunicorn's own loggers come out the same way). The request id, the
user and the key prefix of the request being served are added to every line logged while
it is served; the request middleware writes one `request` line per response with the
endpoint, status, latency, cache result and quota decision.

Nothing secret reaches a log line: values of sensitive fields (authorization, passwords,
tokens, prompts...) are dropped and anything that looks like a full API key is cut down to
its prefix, unless LOG_SENSITIVE_DATA is set for a debugging session.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import structlog
from structlog.types import EventDict, WrappedLogger

from config.middleware import current_request, principal_of, request_id_var

# A full key (`tg_<prefix>_<secret>`); the prefix alone is not secret.
_KEY_PATTERN = re.compile(r"\b(tg_[a-z0-9]{8})_[A-Za-z0-9_\-]{16,}")
_TOKEN_PATTERN = re.compile(r"(?i)\b(bearer|token)\s+[A-Za-z0-9._~+/=\-]{16,}")
# One cheap scan decides whether a string needs the two substitutions below.
_MAY_HOLD_SECRET = re.compile(r"tg_|(?i:bearer|token)")
SENSITIVE_FIELDS = frozenset(
    {
        "authorization",
        "api_key",
        "key",
        "secret",
        "password",
        "token",
        "prompt",
        "messages",
        "text",
        "content",
        "cookie",
        "x_api_key",
        "sessionid",
        "csrftoken",
    }
)
REDACTED = "[redacted]"


def redact_text(value: str) -> str:
    """Cut full API keys down to their prefix and drop bearer tokens from a string."""
    value = _KEY_PATTERN.sub(r"\1_" + REDACTED, value)
    return _TOKEN_PATTERN.sub(r"\1 " + REDACTED, value)


def add_request_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Add the request id, user and key prefix of the request being served, if any.

    The user and key are read only once authentication has resolved them: this never
    triggers a session or database look-up of its own.
    """
    request_id = request_id_var.get()
    if request_id and "request_id" not in event_dict:
        event_dict["request_id"] = request_id
    request = current_request()
    if request is not None:
        user, key_prefix = principal_of(request)
        if user is not None:
            event_dict.setdefault("user", user)
        if key_prefix is not None:
            event_dict.setdefault("key_prefix", key_prefix)
    return event_dict


def scrub_sensitive(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Drop sensitive fields and cut keys out of every string value."""
    from django.conf import settings

    if getattr(settings, "LOG_SENSITIVE_DATA", False):
        return event_dict
    for name, value in event_dict.items():
        if name.lower() in SENSITIVE_FIELDS:
            event_dict[name] = REDACTED
        elif isinstance(value, str) and _MAY_HOLD_SECRET.search(value):
            event_dict[name] = redact_text(value)
    return event_dict


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    # A record another handler formatted first carries its rendered message: same as event.
    if event_dict.get("message") == event_dict.get("event"):
        event_dict.pop("message", None)
    return event_dict


SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    add_request_context,
    _drop_color_message,
]


_CHATTY_CLIENT_LOGGERS = (
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "urllib3",
    "openai",
    "google_genai",
)


class UnexpectedServerErrors(logging.Filter):
    """Lets through django.request's records of 500s only. Its "Service Unavailable: /path"
    for a 502, 503 or 504 is an answer the API chose (an upstream failure, a service away),
    which the request line and the metrics already record with its code: during a provider
    outage it would be a second line per refused request."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "status_code", 500) == 500


def logging_config(*, level: str = "INFO", fmt: str = "json") -> dict[str, Any]:
    """The LOGGING dict: stdlib records and structlog events through one JSON formatter."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    client_level = "DEBUG" if level.upper() == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structured": {
                "()": structlog.stdlib.ProcessorFormatter,
                "foreign_pre_chain": SHARED_PROCESSORS,
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    scrub_sensitive,
                    renderer,
                ],
            }
        },
        "filters": {"unexpected_server_errors": {"()": UnexpectedServerErrors}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "structured"},
            "drop": {"class": "logging.NullHandler"},
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # Django's own console (plain text, with DEBUG) and mail handlers: everything
            # goes to the root's structured handler instead, once.
            "django": {"handlers": [], "propagate": True},
            "django.db.backends": {"level": "WARNING"},
            # The request middleware writes one structured line per request, with its
            # status: runserver's access lines and django.request's "Unauthorized: /path"
            # for every 4xx, or "Service Unavailable: /path" for every 503, would say it
            # again. A 500 is still logged, with its traceback.
            "django.server": {"handlers": ["drop"], "propagate": False},
            "django.request": {"level": "ERROR", "filters": ["unexpected_server_errors"]},
            "gunicorn.error": {"handlers": ["console"], "level": level, "propagate": False},
            # The provider SDKs and their HTTP clients log every upstream call at INFO
            # ("HTTP Request: POST <upstream URL> ..."), a second line per cache miss that
            # the request line and tollgate_upstream_calls_total already tell. LOG_LEVEL=DEBUG
            # shows them, with the rest.
            **{name: {"level": client_level} for name in _CHATTY_CLIENT_LOGGERS},
        },
    }


def structlog_configure() -> None:
    """Route structlog through the standard library so one formatter renders everything."""
    structlog.configure(
        processors=[
            # First: an event below its logger's level is dropped before any work is done.
            structlog.stdlib.filter_by_level,
            *SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


_SENTRY_HEADER_DENYLIST = frozenset({"authorization", "x-api-key", "cookie", "set-cookie"})


def sentry_before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Tag every Sentry event with the request id, and keep keys and prompts out of it."""
    request_id = request_id_var.get()
    if request_id:
        event.setdefault("tags", {})["request_id"] = request_id
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("data", None)
        request.pop("cookies", None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            for name in list(headers):
                if name.lower() in _SENTRY_HEADER_DENYLIST:
                    headers[name] = REDACTED
    for exception in (event.get("exception") or {}).get("values") or ():
        if isinstance(exception.get("value"), str):
            exception["value"] = redact_text(exception["value"])
    return event


def sentry_init(*, dsn: str, environment: str, release: str | None, traces_rate: float) -> None:
    """Start Sentry with the Django, Celery and logging integrations (no PII sent), and only
    those: Sentry's auto-enabled integrations would import both provider SDKs into every
    worker at start (about 50 MiB more per worker, over DESIGN.md's 120), wrap every Redis
    command and upstream call on the hot path, and add tracing headers to the requests
    Tollgate sends to model providers."""
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        release=release,
        # 0 is "tracing on, nothing sampled": every request and query would still build
        # its spans. None turns tracing off.
        traces_sample_rate=traces_rate or None,
        # No PII: left unset, send_default_pii keeps its default, off (setting it is
        # deprecated in favour of data_collection, which collects more unless restricted).
        max_request_body_size="never",  # bodies hold prompts
        # Every frame's local variables would go out with an error, scrubbed only of a few
        # names (`api_key`, `secret`...): a key header or a request body held in any other
        # local (`raw`, `data`) would reach Sentry whole.
        include_local_variables=False,
        auto_enabling_integrations=False,
        integrations=[
            # A span per middleware and per signal receiver costs every request CPU even
            # when no trace is sampled: only with tracing on.
            DjangoIntegration(middleware_spans=traces_rate > 0, signals_spans=traces_rate > 0),
            CeleryIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
        before_send=sentry_before_send,  # type: ignore[arg-type]
    )

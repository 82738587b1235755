"""Tollgate settings: one module, every value from the environment.

With DATABASE_URL and REDIS_URL unset the service runs on the embedded default (SQLite,
in-process cache and quota backend, the offline `local` provider), which is only there so
that `make run` works on a bare machine. Production and the test suite set both.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from config.env import StrictEnv

BASE_DIR = Path(__file__).resolve().parent.parent

env = StrictEnv()
if env.bool("DJANGO_READ_DOT_ENV_FILE", default=False):
    # Real environment variables win over the file.
    env.read_env(str(BASE_DIR / ".env"), overwrite=False)

TESTING = env.bool("TOLLGATE_TESTING", default=False)

# --- CORE ---
DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set (or DEBUG=1 for a local development server)."
        )
    SECRET_KEY = "django-insecure-local-development-only"  # noqa: S105
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files (static files only)
    "corsheaders",
    "quotas",
    "caching",
    "generation",
    "health",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "config.middleware.RequestIdMiddleware",
    "config.middleware.ProbeMiddleware",  # probes and /metrics whatever the Host
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.CSPMiddleware",  # django-csp's, with the policy built once
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "config.middleware.MessageMiddleware",  # Django's, with the storage built on first use
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "config.middleware.PrometheusAfterMiddleware",  # django-prometheus's, series kept
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- DATABASE ---
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DATABASES["default"].setdefault(
    "CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60, minimum=0)
)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# PostgreSQL: a query on the request path that gets no answer within this many seconds
# fails (config/db/deadline.py), as if the server were stopped: a hung server does not hold
# every request thread. Above DATABASE_LOCK_TIMEOUT_MS, so that a lock wait fails first,
# as itself. Commands, migrations and Celery tasks have no deadline. 0: none.
DATABASE_READ_TIMEOUT = env.int("DATABASE_READ_TIMEOUT_MS", default=5000, minimum=0) / 1000
# The ledger INSERT of a served request gets at most this long of it: a row the database
# does not take in time goes to the spool, and a hung server holds generation for this
# long rather than DATABASE_READ_TIMEOUT_MS. 0: the read deadline.
LEDGER_WRITE_TIMEOUT = env.int("LEDGER_WRITE_TIMEOUT_MS", default=1000, minimum=0) / 1000
if os.environ.get("TEST_DATABASE_NAME"):
    DATABASES["default"]["TEST"] = {"NAME": os.environ["TEST_DATABASE_NAME"]}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The embedded default: SQLite cannot enforce the roll-up's NULLS NOT DISTINCT unique
    # constraint (rows of deleted users); the roll-up service replaces a day's rows whole.
    SILENCED_SYSTEM_CHECKS = ["models.W047"]

# --- REDIS AND CACHE ---
REDIS_URL = env("REDIS_URL", default="")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured("REDIS_URL must be a redis://, rediss:// or unix:// URL.")
REDIS_SOCKET_TIMEOUT = env.float("REDIS_SOCKET_TIMEOUT", default=0.5, minimum=0.001)
# Every key Tollgate writes in Redis starts with this prefix.
REDIS_KEY_PREFIX = env("REDIS_KEY_PREFIX", default="tg")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_KEY_PREFIX,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": REDIS_SOCKET_TIMEOUT,
                "SOCKET_TIMEOUT": REDIS_SOCKET_TIMEOUT,
                "CONNECTION_POOL_KWARGS": {"max_connections": 64, "health_check_interval": 30},
            },
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "tollgate",
        }
    }

# --- CACHE TIER ---
CACHE_MEMORY_MAX_SIZE = env.int("CACHE_MEMORY_MAX_SIZE", default=1000, minimum=0)
CACHE_MEMORY_TTL = env.int("CACHE_MEMORY_TTL", default=600, minimum=0)
CACHE_REDIS_TTL = env.int("CACHE_REDIS_TTL", default=3600, minimum=1)
CACHE_BROWSER_TTL = env.int("CACHE_BROWSER_TTL", default=300, minimum=0)
CACHE_CDN_TTL = env.int("CACHE_CDN_TTL", default=1800, minimum=0)
CACHE_CDN_ENABLED = env.bool("CACHE_CDN_ENABLED", default=False)
CACHE_POPULAR_THRESHOLD = env.int("CACHE_POPULAR_THRESHOLD", default=10, minimum=1)
QUOTA_FALLBACK_CACHE_TTL = env.int("QUOTA_FALLBACK_CACHE_TTL", default=3600, minimum=0)
# The account whose quotas pay for warming and refreshing popular topics (username; empty:
# the first active superuser).
CACHE_WARM_USER = env("CACHE_WARM_USER", default="")

# --- QUOTAS ---
QUOTA_FAIL_MODE = env("QUOTA_FAIL_MODE", default="open")
if QUOTA_FAIL_MODE not in ("open", "closed"):
    raise ImproperlyConfigured("QUOTA_FAIL_MODE must be 'open' or 'closed'.")
QUOTA_SAFETY_MARGIN = env.float("QUOTA_SAFETY_MARGIN", default=0.8)
if not 0 <= QUOTA_SAFETY_MARGIN <= 1:
    raise ImproperlyConfigured("QUOTA_SAFETY_MARGIN must be between 0 and 1.")
# Plan applied to a user who has no UserQuota row (by name; missing plan = no plan limits).
QUOTA_DEFAULT_PLAN = env("QUOTA_DEFAULT_PLAN", default="free")
# A concurrency lease (and its reservation) not settled within this many seconds is
# considered abandoned by a crashed worker and is refunded.
QUOTA_LEASE_TTL = env.int("QUOTA_LEASE_TTL", default=300, minimum=1)
# The fail-open in-process limiter divides request limits by this number of workers.
# gunicorn.conf.py's number of workers when WEB_CONCURRENCY is unset.
QUOTA_WORKER_COUNT = env.int(
    "QUOTA_WORKER_COUNT",
    default=env.int("WEB_CONCURRENCY", default=min(2 * (os.cpu_count() or 1), 8), minimum=1),
    minimum=1,
)
AUTH_FAILURES_PER_MINUTE = env.int("AUTH_FAILURES_PER_MINUTE", default=30, minimum=1)
# While PostgreSQL is unreachable, an API key a worker read from it less than this long ago
# is still accepted (its ledger rows are spooled); 0: every request gets the 503.
AUTH_DB_OUTAGE_GRACE_SECONDS = env.float("AUTH_DB_OUTAGE_GRACE_SECONDS", default=300.0, minimum=0)
# Proxies whose X-Forwarded-For is believed (the variable gunicorn reads too; "*": any).
FORWARDED_ALLOW_IPS = env.list("FORWARDED_ALLOW_IPS", default=["127.0.0.1"])
# Ledger rows of cache hits are written in batches at most this many seconds late (0: at once).
USAGE_HIT_BATCH_SECONDS = env.float("USAGE_HIT_BATCH_SECONDS", default=1.0, minimum=0)
# With hit rows written at once (USAGE_HIT_BATCH_SECONDS=0), how often rows spooled in an
# outage are tried again (0: only by an explicit usage_flush(), as in tests).
LEDGER_SPOOL_REPLAY_SECONDS = env.float("LEDGER_SPOOL_REPLAY_SECONDS", default=1.0, minimum=0)
# Ledger rows the database cannot take yet wait here, on local disk, so that a worker killed
# meanwhile loses none (quotas/services/spool.py). Shared by the workers of one host.
LEDGER_SPOOL_DIR = env(
    "LEDGER_SPOOL_DIR", default=os.path.join(tempfile.gettempdir(), "tollgate-ledger-spool")
)

# --- GENERATION ---
TOLLGATE_DEFAULT_MODEL = env("TOLLGATE_DEFAULT_MODEL", default="") or "local/demo"
OPENAI_API_KEY = env("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env("OPENAI_BASE_URL", default="")
# The request field that bounds an answer's length upstream. OpenAI's own API takes
# max_completion_tokens for every chat model and refuses max_tokens for its reasoning
# models; other OpenAI-compatible servers (vLLM, Ollama...) know max_tokens for certain.
# Empty: max_completion_tokens for OpenAI's API, max_tokens for any other base URL.
OPENAI_MAX_TOKENS_PARAM = env("OPENAI_MAX_TOKENS_PARAM", default="")
if OPENAI_MAX_TOKENS_PARAM not in ("", "max_tokens", "max_completion_tokens"):
    raise ImproperlyConfigured(
        "OPENAI_MAX_TOKENS_PARAM must be 'max_tokens' or 'max_completion_tokens' (or empty)."
    )
GEMINI_API_KEY = env("GEMINI_API_KEY", default="")
GEMINI_BASE_URL = env("GEMINI_BASE_URL", default="")
LOCAL_PROVIDER_LATENCY_MS = env.int("LOCAL_PROVIDER_LATENCY_MS", default=0, minimum=0)
UPSTREAM_CONNECT_TIMEOUT = env.float("UPSTREAM_CONNECT_TIMEOUT", default=5.0, minimum=0.001)
UPSTREAM_READ_TIMEOUT = env.float("UPSTREAM_READ_TIMEOUT", default=60.0, minimum=0.001)
UPSTREAM_MAX_ATTEMPTS = env.int("UPSTREAM_MAX_ATTEMPTS", default=3, minimum=1)
UPSTREAM_MAX_RETRY_SECONDS = env.float("UPSTREAM_MAX_RETRY_SECONDS", default=30.0, minimum=0)
CIRCUIT_FAILURE_THRESHOLD = env.int("CIRCUIT_FAILURE_THRESHOLD", default=5, minimum=1)
CIRCUIT_RESET_SECONDS = env.float("CIRCUIT_RESET_SECONDS", default=30.0, minimum=0)
# A worker that found a circuit closed without failures trusts that for this long before
# asking Redis again: a circuit opened by another worker is seen within this bound.
CIRCUIT_CLOSED_CACHE_SECONDS = env.float("CIRCUIT_CLOSED_CACHE_SECONDS", default=0.25, minimum=0)
# Full-jitter exponential backoff between attempts: random(0, min(max, base * 2**n)).
UPSTREAM_BACKOFF_BASE = env.float("UPSTREAM_BACKOFF_BASE", default=0.5, minimum=0)
UPSTREAM_BACKOFF_MAX = env.float("UPSTREAM_BACKOFF_MAX", default=8.0, minimum=0)
# The offline provider's simulated failures (fractions of calls, 0..1).
LOCAL_PROVIDER_FAILURE_RATE = env.float(
    "LOCAL_PROVIDER_FAILURE_RATE", default=0.0, minimum=0, maximum=1
)
LOCAL_PROVIDER_TIMEOUT_RATE = env.float(
    "LOCAL_PROVIDER_TIMEOUT_RATE", default=0.0, minimum=0, maximum=1
)
GENERATION_IDEMPOTENCY_TTL = env.int("GENERATION_IDEMPOTENCY_TTL", default=24 * 3600, minimum=1)
# Parallel upstream calls of one /topics/explanations request.
EXPLANATIONS_MAX_WORKERS = env.int("EXPLANATIONS_MAX_WORKERS", default=4, minimum=1)
API_MAX_BODY_BYTES = env.int("API_MAX_BODY_BYTES", default=256 * 1024, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES

# --- CELERY ---
# Broker: Redis by default, RabbitMQ (amqp://) works too. Results go to Redis with a Redis
# broker and back over the broker (rpc://) otherwise; jobs keep their own state in
# PostgreSQL, so task results are not stored unless a task asks for it.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = env(
    "CELERY_RESULT_BACKEND",
    default=(
        CELERY_BROKER_URL
        if CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
        else "rpc://"
        if CELERY_BROKER_URL.startswith(("amqp://", "amqps://"))
        else "cache+memory://"
    ),
)
CELERY_TASK_IGNORE_RESULT = True
# Late acknowledgement: a task whose worker dies is delivered again; every task is idempotent.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=300, minimum=1)
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=240, minimum=1)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_DEFAULT_QUEUE = "default"
# Batch jobs have a queue of their own so a long batch never delays the periodic tasks.
CELERY_TASK_ROUTES = {"generation.tasks.*": {"queue": "jobs"}}
CELERY_TIMEZONE = "UTC"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A job refused for quota waits at most this long before it asks again (a day window may
# reset hours later; a shorter wait keeps countdown messages well inside the visibility
# timeout below, after which Redis would deliver an unacknowledged message again).
JOB_RETRY_MAX_COUNTDOWN = env.int("JOB_RETRY_MAX_COUNTDOWN", default=900, minimum=1)
JOB_MAX_QUOTA_RETRIES = env.int("JOB_MAX_QUOTA_RETRIES", default=200, minimum=0)
JOB_MAX_SUBTOPICS = 20
# Finished jobs (and their results) are deleted this many days after they finished; 0 keeps them.
JOB_RETENTION_DAYS = env.int("JOB_RETENTION_DAYS", default=30, minimum=0)
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": max(3600, 4 * JOB_RETRY_MAX_COUNTDOWN)}
# An unfinished job untouched this long, and held by no worker, has lost its message (Redis
# gives an unacknowledged one back after the visibility timeout): the sweep sends it again.
JOB_STALE_SECONDS = env.int(
    "JOB_STALE_SECONDS",
    default=2 * CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"],
    minimum=60,
)
# A running job's lock lives this long and its run renews it every third of it: a job whose
# worker died (SIGKILL, OOM, a lost node) is run again by the sweep this long plus a sweep
# period later, while a live run, however long, keeps its job to itself.
JOB_LOCK_SECONDS = env.int("JOB_LOCK_SECONDS", default=60, minimum=3)
CELERY_BEAT_SCHEDULE = {
    # Popular topics (past CACHE_POPULAR_THRESHOLD requests) kept warm.
    "cache-popular-refresh": {
        "task": "caching.popular_refresh",
        "schedule": env.float("CELERY_POPULAR_REFRESH_SECONDS", default=3600.0, minimum=1),
    },
    # The ledger rolled up into daily aggregates (today, yesterday and any earlier day that
    # got rows since, idempotent).
    "usage-rollup": {
        "task": "quotas.tasks.usage_rollup",
        "schedule": env.float("CELERY_USAGE_ROLLUP_SECONDS", default=300.0, minimum=1),
    },
    # 80% / 100% of a day or month budget: one alert per threshold per period.
    "budget-alerts": {
        "task": "quotas.tasks.budget_alerts_check",
        "schedule": env.float("CELERY_BUDGET_ALERTS_SECONDS", default=60.0, minimum=1),
    },
    # Leases and reservations left by crashed workers are refunded.
    "quota-sweep": {
        "task": "quotas.tasks.quota_sweep",
        "schedule": env.float("CELERY_QUOTA_SWEEP_SECONDS", default=60.0, minimum=1),
    },
    # Finished batch jobs past JOB_RETENTION_DAYS are deleted.
    "jobs-purge": {
        "task": "generation.tasks.jobs_purge",
        "schedule": env.float("CELERY_JOBS_PURGE_SECONDS", default=86400.0, minimum=1),
    },
    # Unfinished batch jobs whose worker died or whose message was lost are sent again.
    "jobs-sweep": {
        "task": "generation.tasks.jobs_sweep",
        "schedule": env.float("CELERY_JOBS_SWEEP_SECONDS", default=60.0, minimum=1),
    },
    # Live refusal counts copied to the database (the dashboard's denials by reason).
    "denials-persist": {
        "task": "quotas.tasks.denials_persist",
        "schedule": env.float("CELERY_DENIALS_PERSIST_SECONDS", default=300.0, minimum=1),
    },
}

# --- BUDGET ALERTS ---
# Thresholds in percent of a user's day or month cost budget.
try:
    BUDGET_ALERT_THRESHOLDS = env.list("BUDGET_ALERT_THRESHOLDS", cast=int, default=[80, 100])
except ValueError:
    raise ImproperlyConfigured(
        f"BUDGET_ALERT_THRESHOLDS must be whole numbers (percent), comma-separated, not "
        f"{os.environ['BUDGET_ALERT_THRESHOLDS']!r}."
    ) from None
if min(BUDGET_ALERT_THRESHOLDS, default=1) < 1:
    raise ImproperlyConfigured(
        f"BUDGET_ALERT_THRESHOLDS must each be at least 1, not {BUDGET_ALERT_THRESHOLDS}."
    )
# Extra recipients of every alert (the user's own address is always used when known).
BUDGET_ALERT_EMAILS = env.list("BUDGET_ALERT_EMAILS", default=[])
BUDGET_ALERT_EMAIL_USER = env.bool("BUDGET_ALERT_EMAIL_USER", default=True)
# A JSON POST per alert; empty: no webhook.
BUDGET_ALERT_WEBHOOK_URL = env("BUDGET_ALERT_WEBHOOK_URL", default="")
BUDGET_ALERT_WEBHOOK_TIMEOUT = env.float("BUDGET_ALERT_WEBHOOK_TIMEOUT", default=5.0, minimum=0.001)
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25, minimum=1, maximum=65535)
EMAIL_HOST_USER = env("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10, minimum=1)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="tollgate@localhost")

# --- API ---
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "quotas.authentication.ApiKeyAuthentication",
        "quotas.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "quotas.permissions.KeyScopePermission",
        "quotas.permissions.NotSuspended",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": ["config.parsers.BoundedJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "config.negotiation.JSONFirstNegotiation",
    "EXCEPTION_HANDLER": "config.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "config.schema.TollgateAutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tollgate API",
    "DESCRIPTION": "Quota-governed, cached access to LLM providers.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI (and Redoc) from drf-spectacular-sidecar's static files, served by the app
    # like any other static file, instead of an unpinned CDN copy.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
CORS_ALLOWED_ORIGINS = env.list("CORS_ALLOWED_ORIGINS", default=[])
CORS_URLS_REGEX = r"^/(api|v1)/.*$"

# --- OBSERVABILITY ---
# /metrics answers only `Authorization: Bearer <METRICS_TOKEN>` when it is set.
METRICS_TOKEN = env("METRICS_TOKEN", default="")
SENTRY_DSN = env("SENTRY_DSN", default="")
SENTRY_ENVIRONMENT = env("SENTRY_ENVIRONMENT", default="development" if DEBUG else "production")
SENTRY_RELEASE = env("SENTRY_RELEASE", default="") or None
# A share of the requests (Sentry turns tracing off, with a warning only, outside 0..1).
SENTRY_TRACES_SAMPLE_RATE = env.float(
    "SENTRY_TRACES_SAMPLE_RATE", default=0.0, minimum=0, maximum=1
)
# Any case (gunicorn's own GUNICORN_LOG_LEVEL is lowercase): logging knows only capitals.
LOG_LEVEL = env("LOG_LEVEL", default="INFO").strip().upper()
if LOG_LEVEL not in logging.getLevelNamesMapping():
    raise ImproperlyConfigured(
        f"LOG_LEVEL must be a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL), not "
        f"{LOG_LEVEL!r}."
    )
# json (one object per line) or console (readable, for a terminal).
LOG_FORMAT = env("LOG_FORMAT", default="json").strip().lower()
if LOG_FORMAT not in ("json", "console"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or console, not {LOG_FORMAT!r}.")
# Debugging only: keep keys, tokens and prompt text in log lines instead of redacting them.
LOG_SENSITIVE_DATA = env.bool("LOG_SENSITIVE_DATA", default=False)
# Readiness: each dependency is given this many seconds; a failing required check makes
# /health/ready 503, a failing optional one `degraded` (200). Redis is optional while
# quotas fail open. A timeout of 0 or less would fail every Redis and broker check.
HEALTH_CHECK_TIMEOUT = env.float("HEALTH_CHECK_TIMEOUT", default=1.0, minimum=0.001)
HEALTH_REQUIRED_CHECKS = [
    name.strip()
    for name in env.list(
        "HEALTH_REQUIRED_CHECKS",
        default=["database", "redis"] if QUOTA_FAIL_MODE == "closed" else ["database"],
    )
    if name.strip()
]
# The checks of health/probes.py: a name it does not know would be required in vain (a
# misspelt "reddis" leaves Redis optional without a word).
_UNKNOWN_CHECKS = sorted(set(HEALTH_REQUIRED_CHECKS) - {"database", "redis", "broker"})
if _UNKNOWN_CHECKS:
    raise ImproperlyConfigured(
        "HEALTH_REQUIRED_CHECKS must name checks among database, redis and broker, not "
        f"{', '.join(_UNKNOWN_CHECKS)}."
    )
# django-prometheus's database and cache wrappers: queries, errors and latencies per alias,
# cache get/hit/miss counts. Same drivers underneath; off with PROMETHEUS_DB_CACHE_METRICS=0.
if env.bool("PROMETHEUS_DB_CACHE_METRICS", default=True):
    _WRAPPED_ENGINES = {
        "django.db.backends.postgresql": "django_prometheus.db.backends.postgresql",
        "django.db.backends.sqlite3": "django_prometheus.db.backends.sqlite3",
    }
    DATABASES["default"]["ENGINE"] = _WRAPPED_ENGINES.get(
        DATABASES["default"]["ENGINE"], DATABASES["default"]["ENGINE"]
    )
    if CACHES["default"]["BACKEND"] == "django_redis.cache.RedisCache":
        CACHES["default"]["BACKEND"] = "django_prometheus.cache.backends.redis.RedisCache"
# PostgreSQL through config.db: the health check of a reused connection looks at its
# socket and runs `SELECT 1` only when the server has sent something (config/db/base.py).
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASE_ENGINE_BASE = DATABASES["default"]["ENGINE"]
    DATABASES["default"]["ENGINE"] = "config.db"
# An unreachable database fails a readiness probe (and a request) in seconds, not minutes.
if DATABASES["default"]["ENGINE"] == "config.db":
    _DB_OPTIONS = DATABASES["default"].setdefault("OPTIONS", {})
    # libpq waits for ever at 0 (and, silently, at any negative value: refused here).
    _DB_OPTIONS.setdefault(
        "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=3, minimum=0)
    )
    # A statement waits at most this long for a lock (a migration's ALTER on the ledger, a
    # LOCK TABLE), then fails: the ledger INSERT goes to the spool instead of holding its
    # request, and a migration stuck behind a long query fails instead of queueing every
    # INSERT behind it. 0: wait for ever.
    _LOCK_TIMEOUT_MS = env.int("DATABASE_LOCK_TIMEOUT_MS", default=3000, minimum=0)
    if _LOCK_TIMEOUT_MS:
        _DB_OPTIONS["options"] = (
            f"{_DB_OPTIONS.get('options', '')} -c lock_timeout={_LOCK_TIMEOUT_MS}".strip()
        )
    # Data the server does not acknowledge (a dead link, a host gone) fails the connection
    # after this long, instead of after the kernel's quarter of an hour of retransmissions.
    _DB_OPTIONS.setdefault(
        "tcp_user_timeout", env.int("DATABASE_TCP_USER_TIMEOUT_MS", default=10000, minimum=0)
    )
from config.logging import logging_config, sentry_init, structlog_configure  # noqa: E402

LOGGING = logging_config(level=LOG_LEVEL, fmt=LOG_FORMAT)
structlog_configure()
if SENTRY_DSN:
    sentry_init(
        dsn=SENTRY_DSN,
        environment=SENTRY_ENVIRONMENT,
        release=SENTRY_RELEASE,
        traces_rate=SENTRY_TRACES_SAMPLE_RATE,
    )

# --- SECURITY ---
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SESSION_COOKIE_HTTPONLY = True
# TLS ends at the ingress or nginx, which sets X-Forwarded-Proto (and replaces a client's).
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("SECURE_PROXY_SSL", default=not DEBUG) else None
)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG and not TESTING)
# Probes and scrapes reach the pods over plain HTTP from inside the cluster.
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=not DEBUG)
# Content-Security-Policy (django-csp): nothing from another origin, no inline script or
# style; the dashboard draws its charts as inline SVG markup. Swagger UI (/api/docs/) needs
# no exception: its files are the app's static files, its page has no inline script or
# style (config/schema_views.py).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}
if env("CSP_REPORT_URI", default=""):
    CONTENT_SECURITY_POLICY["DIRECTIVES"]["report-uri"] = [env("CSP_REPORT_URI")]
# CORS (django-cors-headers): origins from CORS_ALLOWED_ORIGINS above, /api/ and /v1/ only.
CORS_ALLOW_HEADERS = (
    "accept",
    "authorization",
    "content-type",
    "user-agent",
    "x-api-key",
    "x-request-id",
    "idempotency-key",
)
CORS_EXPOSE_HEADERS = (
    "x-request-id",
    "x-cache",
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
)
CORS_PREFLIGHT_MAX_AGE = env.int("CORS_PREFLIGHT_MAX_AGE", default=3600, minimum=0)

# --- I18N, STATIC ---
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

"""Gunicorn settings for Tollgate (`gunicorn -c config/gunicorn.conf.py config.wsgi`).

Every value can be overridden from the environment (GUNICORN_* or the usual WEB_CONCURRENCY).
"""

import os
import tempfile

# Prometheus multiprocess mode must be on before prometheus_client is first imported.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), "tollgate-prometheus")
)

from config import gunicorn_hooks  # noqa: E402

gunicorn_hooks.multiprocess_dir_prepare()

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "90"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "0"))
# Request lines are logged by the application as JSON; gunicorn's own access log is off.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

on_starting = gunicorn_hooks.on_starting
child_exit = gunicorn_hooks.child_exit

#!/bin/sh
# Container entry point: read secrets given as files (VAR_FILE=/run/secrets/... becomes VAR),
# prepare the writable scratch directories (the root filesystem is read-only; /tmp is a
# tmpfs or an emptyDir), optionally migrate, then exec the command (gunicorn by default;
# `celery -A config worker|beat` for the other roles).
set -eu

for var in SECRET_KEY DATABASE_URL METRICS_TOKEN OPENAI_API_KEY GEMINI_API_KEY SENTRY_DSN \
           EMAIL_HOST_PASSWORD BUDGET_ALERT_WEBHOOK_URL; do
    file_var="${var}_FILE"
    eval "file=\${${file_var}:-}"
    if [ -n "${file}" ]; then
        if [ ! -r "${file}" ]; then
            echo "entrypoint: ${file_var}=${file} is not readable" >&2
            exit 1
        fi
        value="$(cat "${file}")"
        export "${var}=${value}"
        unset "${file_var}"
    fi
done

mkdir -p "${PROMETHEUS_MULTIPROC_DIR:-/tmp/prometheus}"

if [ "${DJANGO_MIGRATE_ON_START:-0}" = "1" ]; then
    python manage.py migrate --noinput
fi

exec "$@"

#!/bin/sh
# Container entry point: read secrets given as files (VAR_FILE=/run/secrets/... becomes VAR),
# prepare the writable scratch directories (the root filesystem is read-only; /tmp is a
# tmpfs or an emptyDir), optionally migrate, then exec the command (gunicorn by default;
# `celery -A config worker|beat` for the other roles).
set -eu

# An empty file gives an empty value: an optional secret that is unused (no Sentry DSN, no
# webhook) is an empty file, since compose will not start a service whose secret file is
# missing. A non-empty VAR next to VAR_FILE is refused (as the postgres image refuses both):
# a value left in deploy/.env is shown by `docker inspect`, and the file would silently
# replace it (an empty file would turn Sentry or the webhook off without a word).
for var in SECRET_KEY DATABASE_URL METRICS_TOKEN OPENAI_API_KEY GEMINI_API_KEY SENTRY_DSN \
           EMAIL_HOST_PASSWORD BUDGET_ALERT_WEBHOOK_URL; do
    file_var="${var}_FILE"
    eval "file=\${${file_var}:-}"
    if [ -n "${file}" ]; then
        eval "plain=\${${var}:-}"
        if [ -n "${plain}" ]; then
            echo "entrypoint: both ${var} and ${file_var} are set; keep only ${file_var}" >&2
            exit 1
        fi
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

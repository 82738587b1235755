# syntax=docker/dockerfile:1
# Tollgate: a multi-stage image. The builder compiles wheels (it has the compilers); the
# final stage installs only those wheels on a slim base and runs as a non-root user.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 libpq-dev=15.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements/ requirements/
RUN pip wheel --wheel-dir /wheels -r requirements/prod.txt

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG APP_UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=config.settings \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus \
    PORT=8000
# Runtime libraries only: libpq for PostgreSQL, curl for the HEALTHCHECK, the PostgreSQL
# client for the backup scripts. No compiler reaches this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5=15.* curl=7.* postgresql-client=15* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${APP_UID}" tollgate \
    && useradd --system --uid "${APP_UID}" --gid tollgate --home-dir /app --shell /usr/sbin/nologin tollgate
COPY --from=builder /wheels /wheels
RUN pip install --no-index --find-links=/wheels /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY --chown=tollgate:tollgate . .
# /backups: the mount point of the compose backup volume, writable by the app user.
# collectstatic loads the apps, whose metrics would go to PROMETHEUS_MULTIPROC_DIR, a
# directory only the entry point makes (at start, in the container's /tmp): the build
# leaves the variable out, so it needs no such directory and bakes no metric file.
RUN env -u PROMETHEUS_MULTIPROC_DIR SECRET_KEY=collectstatic-only \
        python manage.py collectstatic --noinput \
    && chmod 0755 deploy/backup/*.sh deploy/docker-entrypoint.sh \
    && install -d -o "${APP_UID}" -g "${APP_UID}" /backups
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--max-time", "2", "http://127.0.0.1:8000/health/live"]
ENTRYPOINT ["deploy/docker-entrypoint.sh"]
# gunicorn reads /app/gunicorn.conf.py (workers, class and timeouts from the environment).
CMD ["gunicorn", "config.wsgi:application"]

"""The container entry point's secret files (`VAR_FILE` becomes `VAR`), run as the image
runs it: `deploy/docker-entrypoint.sh <command>` under `sh`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(settings.BASE_DIR)
SECRETS = ("SECRET_KEY", "DATABASE_URL", "METRICS_TOKEN", "OPENAI_API_KEY", "GEMINI_API_KEY")
SECRETS += ("SENTRY_DSN", "EMAIL_HOST_PASSWORD", "BUDGET_ALERT_WEBHOOK_URL")


def entrypoint(tmp_path: Path, *command: str, **env: str) -> subprocess.CompletedProcess:
    """Run the entry point with only `env` (and PATH) set, as a container starts."""
    environment = {"PATH": os.environ["PATH"], "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "p")}
    return subprocess.run(
        ["sh", str(ROOT / "deploy/docker-entrypoint.sh"), *command],
        env={**environment, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def printed_env(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_entrypoint_reads_every_secret_from_its_file_and_drops_the_path(tmp_path):
    files = {}
    for name in SECRETS:
        (tmp_path / name.lower()).write_text(f"value-of-{name}\n")
        files[f"{name}_FILE"] = str(tmp_path / name.lower())

    env = printed_env(entrypoint(tmp_path, "env", **files))

    for name in SECRETS:
        assert env[name] == f"value-of-{name}"  # the trailing newline dropped
        assert f"{name}_FILE" not in env


def test_entrypoint_gives_an_empty_optional_secret_file_as_an_empty_value(tmp_path):
    for name in ("sentry_dsn", "email_host_password", "budget_alert_webhook_url"):
        (tmp_path / name).write_text("")

    env = printed_env(
        entrypoint(
            tmp_path,
            "env",
            SENTRY_DSN_FILE=str(tmp_path / "sentry_dsn"),
            EMAIL_HOST_PASSWORD_FILE=str(tmp_path / "email_host_password"),
            BUDGET_ALERT_WEBHOOK_URL_FILE=str(tmp_path / "budget_alert_webhook_url"),
        )
    )

    assert env["SENTRY_DSN"] == env["EMAIL_HOST_PASSWORD"] == env["BUDGET_ALERT_WEBHOOK_URL"] == ""


def test_entrypoint_with_an_empty_sentry_dsn_file_starts_django_without_sentry(tmp_path):
    (tmp_path / "sentry_dsn").write_text("")
    (tmp_path / "secret_key").write_text("entrypoint-test-" + "x" * 40)
    script = (
        "import django, sentry_sdk; django.setup(); from django.conf import settings; "
        "print('dsn=' + settings.SENTRY_DSN); print('client=' + str(sentry_sdk.get_client()"
        ".is_active()))"
    )

    env = printed_env(
        entrypoint(
            tmp_path,
            sys.executable,
            "-c",
            script,
            DJANGO_SETTINGS_MODULE="config.settings",
            DEBUG="0",
            SENTRY_DSN_FILE=str(tmp_path / "sentry_dsn"),
            SECRET_KEY_FILE=str(tmp_path / "secret_key"),
        )
    )

    assert env["dsn"] == ""
    assert env["client"] == "False"


def test_entrypoint_refuses_a_secret_given_both_plain_and_as_a_file(tmp_path):
    (tmp_path / "sentry_dsn").write_text("")

    result = entrypoint(
        tmp_path,
        "env",
        SENTRY_DSN="https://public@sentry.example/1",
        SENTRY_DSN_FILE=str(tmp_path / "sentry_dsn"),
    )

    assert result.returncode == 1
    assert "both SENTRY_DSN and SENTRY_DSN_FILE are set" in result.stderr
    assert "sentry.example" not in result.stdout + result.stderr


def test_entrypoint_refuses_a_secret_file_it_cannot_read(tmp_path):
    result = entrypoint(tmp_path, "env", SENTRY_DSN_FILE=str(tmp_path / "missing"))

    assert result.returncode == 1
    assert "SENTRY_DSN_FILE" in result.stderr


def test_entrypoint_lists_the_secrets_this_test_knows():
    text = (ROOT / "deploy/docker-entrypoint.sh").read_text()
    listed = text.split("for var in", 1)[1].split(";", 1)[0].replace("\\", " ").split()
    assert sorted(listed) == sorted(SECRETS)

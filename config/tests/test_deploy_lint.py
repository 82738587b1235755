"""The deployment linters of `make lint-deploy`, run as tests so that CI fails on them, and
shown to catch what they are there for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from django.conf import settings

ROOT = Path(settings.BASE_DIR)
BIN = Path(sys.executable).parent
K8S = sorted(p for p in (ROOT / "deploy/k8s").glob("*/*.yaml") if p.name != "kustomization.yaml")


def tool(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed (requirements/dev.txt)")
    return subprocess.run(
        [str(path), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def test_make_lint_runs_the_deployment_linters():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\nlint-deploy:", 1)[1].split("\n\n", 1)[0]
    for command in ("hadolint", "shellcheck", "yamllint", "kubernetes-validate", "check_metrics"):
        assert command in target
    assert "$(MAKE) lint-deploy" in makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    workflow = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    assert {"lint", "test", "image"} <= set(workflow["jobs"])
    steps = " ".join(str(s.get("run", "")) for s in workflow["jobs"]["lint"]["steps"])
    assert "make lint" in steps


def test_dockerfile_passes_hadolint_and_bad_one_does_not(tmp_path):
    ok = tool("hadolint", "Dockerfile")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    refused = tool("hadolint", str(bad))
    assert refused.returncode != 0
    assert "DL3007" in refused.stdout  # the latest tag


def test_dockerfile_final_stage_is_slim_non_root_without_compilers_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    stages = text.split("\nFROM ")
    assert len(stages) >= 3  # a builder and a final stage
    final = stages[-1]
    assert final.startswith("python:")
    assert "-slim" in final.splitlines()[0]
    assert "build-essential" not in final
    assert "gcc" not in final
    assert "USER ${APP_UID}" in final
    assert "HEALTHCHECK" in final
    assert "/health/live" in final
    assert '"gunicorn"' in final


def test_shell_scripts_pass_shellcheck():
    scripts = [*sorted((ROOT / "deploy/backup").glob("*.sh")), ROOT / "deploy/docker-entrypoint.sh"]
    result = tool("shellcheck", *map(str, scripts))
    assert result.returncode == 0, result.stdout


def test_all_yaml_passes_yamllint_and_bad_yaml_does_not(tmp_path):
    ok = tool("yamllint", "--strict", "-c", ".yamllint.yml", ".")
    assert ok.returncode == 0, ok.stdout
    (tmp_path / "bad.yml").write_text("key: [1, 2\nother:  value\n")
    refused = tool("yamllint", "--strict", "-c", str(ROOT / ".yamllint.yml"), ".", cwd=tmp_path)
    assert refused.returncode != 0


def test_kubernetes_manifests_validate_and_invalid_one_does_not(tmp_path):
    assert K8S, "no manifests under deploy/k8s"
    ok = tool("kubernetes-validate", "--strict", "--quiet", *map(str, K8S))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    web = yaml.safe_load((ROOT / "deploy/k8s/base/web-deployment.yaml").read_text())
    web["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = {}
    web["spec"]["replicas"] = "three"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(web))
    refused = tool("kubernetes-validate", "--strict", "--quiet", str(tmp_path / "bad.yaml"))
    assert refused.returncode != 0


def test_web_deployment_is_hardened_and_scaled_as_specified():
    docs = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    pod = docs[("Deployment", "tollgate-web")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(container)
    assert {"requests", "limits"} <= set(container["resources"])
    hpa = docs[("HorizontalPodAutoscaler", "tollgate-web")]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 10)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    assert docs[("PodDisruptionBudget", "tollgate-web")]["spec"]["minAvailable"] == 2
    assert docs[("Ingress", "tollgate")]["spec"]["tls"]
    kinds = {kind for kind, _ in docs}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "NetworkPolicy", "Job"} <= kinds
    assert ("Deployment", "tollgate-worker") in docs
    assert docs[("Deployment", "tollgate-beat")]["spec"]["replicas"] == 1
    secret = docs[("Secret", "tollgate")]
    assert all(
        v == "" or v.startswith(("<", "postgres://tollgate:<", "redis://<"))
        for v in secret["stringData"].values()
    )


def run_check_metrics(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy/check_metrics.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_every_metric_in_alerts_and_dashboard_is_exported():
    result = run_check_metrics()
    assert result.returncode == 0, result.stderr
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    for wanted in (
        "HighErrorRate",
        "HighLatencyP95",
        "QuotaNearExhaustion",
        "BudgetPassed",
        "CircuitOpen",
        "RedisDown",
    ):
        assert f"Tollgate{wanted}" in names


def test_check_metrics_rejects_a_metric_the_service_does_not_export(tmp_path):
    rules = tmp_path / "alerts.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "x",
                        "rules": [
                            {
                                "alert": "Typo",
                                "expr": 'sum(rate(tollgate_request_total{status="500"}[5m])) > 1',
                            },
                            {
                                "alert": "Fine",
                                "expr": "histogram_quantile(0.9, sum by (le) "
                                "(rate(tollgate_upstream_latency_seconds_bucket[5m]))) > 1",
                            },
                        ],
                    }
                ]
            }
        )
    )
    board = tmp_path / "board.json"
    board.write_text(
        json.dumps(
            {
                "panels": [
                    {
                        "title": "p",
                        "targets": [{"expr": "rate(django_http_requests_total_by_view_typo[1m])"}],
                    }
                ]
            }
        )
    )

    result = run_check_metrics("--rules", str(rules), "--dashboards", str(board))

    assert result.returncode == 1
    assert "tollgate_request_total is not exported" in result.stderr
    assert "django_http_requests_total_by_view_typo is not exported" in result.stderr
    assert "tollgate_upstream_latency_seconds_bucket" not in result.stderr

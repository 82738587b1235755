"""The deployment linters of `make lint-deploy`, run as tests so that CI fails on them, and
shown to catch what they are there for."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
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
        # Never a skip: a linter that is missing would pass its artifacts unchecked.
        pytest.fail(f"{name} is not installed in {BIN}: run `make install-dev`")
    return subprocess.run(
        [str(path), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def test_make_lint_runs_the_deployment_linters():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\nlint-deploy:", 1)[1].split("\n\n", 1)[0]
    for command in (
        "hadolint",
        "shellcheck",
        "yamllint",
        "kubernetes-validate",
        "promtool check rules",
        "promtool test rules",
        "check_metrics",
    ):
        assert command in target
    assert "$(MAKE) lint-deploy" in makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    # `make test` and `make lint` get promtool, which requirements/dev.txt cannot provide.
    install_dev = makefile.split("\ninstall-dev:", 1)[1].split("\n", 1)[0]
    assert "$(BIN)/promtool" in install_dev
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
    scripts = [
        *sorted((ROOT / "deploy/backup").glob("*.sh")),
        ROOT / "deploy/docker-entrypoint.sh",
        ROOT / "deploy/install-promtool.sh",
    ]
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


# --- The alert rules, evaluated by Prometheus's own promtool ------------------------------

RULES = ROOT / "deploy/prometheus/alerts.yml"
RULE_TESTS = sorted((ROOT / "deploy/prometheus/tests").glob("*.yml"))


def alert_names() -> set[str]:
    alerts = yaml.safe_load(RULES.read_text())
    return {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}


def test_alert_rules_pass_promtool_check_and_a_broken_rule_does_not(tmp_path):
    ok = tool("promtool", "check", "rules", str(RULES))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "alerts.yml"
    bad.write_text(RULES.read_text().replace("histogram_quantile(0.95,", "histogram_quantile(", 1))
    refused = tool("promtool", "check", "rules", str(bad))
    assert refused.returncode != 0


def test_alert_rules_pass_their_promtool_unit_tests():
    assert RULE_TESTS, "no rule tests under deploy/prometheus/tests"
    result = tool("promtool", "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_unit_tests_that_fire_it_and_that_do_not():
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alert_names() - fired == set(), "never shown to fire"
    assert alert_names() - quiet == set(), "never shown to stay quiet"


# Each rule without what it is there for (a filter, `== 1`, the new-series arm): its unit
# tests must fail, and only its own.
@pytest.mark.parametrize(
    ("alert", "kept", "dropped"),
    [
        ("TollgateAbsent", 'absent(up{job="tollgate"} == 1)', 'absent(up{job="tollgate"})'),
        ("TollgateHighErrorRate", 'endpoint=~"/(api|v1)/.*",', ""),
        ("TollgateHighErrorRate", '{endpoint=~"/(api|v1)/.*"}', ""),
        ("TollgateHighLatencyP95", 'view!~"chat-completions|generate|', 'view!~"'),
        (  # x unless x: the arm for a series the window has not seen yet never answers
            "TollgateRedisDown",
            "unless tollgate_quota_backend_fallbacks_total offset 5m",
            "unless tollgate_quota_backend_fallbacks_total",
        ),
    ],
)
def test_rule_unit_tests_fail_when_a_rule_loses_what_it_is_there_for(
    tmp_path, alert, kept, dropped
):
    text = RULES.read_text()
    assert kept in text
    (tmp_path / "alerts.yml").write_text(text.replace(kept, dropped))
    (tmp_path / "tests").mkdir()
    for path in RULE_TESTS:  # they name their rules as ../alerts.yml
        (tmp_path / "tests" / path.name).write_text(path.read_text())

    result = tool(
        "promtool", "test", "rules", *(f"tests/{p.name}" for p in RULE_TESTS), cwd=tmp_path
    )

    assert result.returncode != 0
    failed = re.findall(r"alertname: (\w+)", result.stdout + result.stderr)
    assert failed
    assert set(failed) == {alert}


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
        "Down",
        "Absent",  # no target at all: Down has no series to compare
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


# --- Consistency between the artifacts and the code -------------------------------------

MIB_PER_WORKER = 120  # DESIGN.md: a web or Celery worker process stays under 120 MiB
MASTER_MIB = 64  # gunicorn's arbiter, or Celery's main process


def k8s_docs() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def container_of(docs: dict, kind: str, name: str) -> dict:
    spec = docs[(kind, name)]["spec"]["template"]["spec"]
    return spec["containers"][0]


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * factor
    return float(quantity) / 2**20


def compose() -> dict:
    return yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())


def read_by_the_code() -> str:
    """Every Python source, the entry point and the backup scripts: a variable the
    artifacts set must be named in them as a quoted string."""
    sources = [
        p
        for p in ROOT.glob("**/*.py")
        if not {".venv", "tests", "bench", "node_modules"} & set(p.relative_to(ROOT).parts)
    ]
    sources += [ROOT / "deploy/docker-entrypoint.sh", *ROOT.glob("deploy/backup/*.sh")]
    return "\n".join(p.read_text() for p in sources)


def test_every_variable_the_artifacts_set_is_one_the_code_reads():
    code = read_by_the_code()
    entrypoint = (ROOT / "deploy/docker-entrypoint.sh").read_text()
    file_vars = entrypoint.split("for var in", 1)[1].split(";", 1)[0].replace("\\", " ").split()
    docs = k8s_docs()
    names = set(docs[("ConfigMap", "tollgate")]["data"]) | set(
        docs[("Secret", "tollgate")]["stringData"]
    )
    for service in compose()["services"].values():
        names |= set(service.get("environment") or {})
    for line in (ROOT / "deploy/env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            names.add(line.split("=", 1)[0])
    unread = []
    for name in sorted(names):
        if name.startswith(("POSTGRES_", "GF_")):  # the postgres and grafana images'
            continue
        base = name.removesuffix("_FILE")
        if name.endswith("_FILE"):
            assert base in file_vars, f"{name}: the entry point reads no such file variable"
        if f'"{base}"' not in code and f"{base}:-" not in code and f"{base}=" not in code:
            unread.append(name)
    assert not unread, f"set by the deployment but read by no code: {unread}"


def test_secrets_reach_the_containers_only_through_the_secret_or_files():
    entrypoint = (ROOT / "deploy/docker-entrypoint.sh").read_text()
    secret_names = set(
        entrypoint.split("for var in", 1)[1].split(";", 1)[0].replace("\\", " ").split()
    )
    assert {"SECRET_KEY", "DATABASE_URL", "METRICS_TOKEN", "OPENAI_API_KEY"} <= secret_names
    docs = k8s_docs()
    assert not secret_names & set(docs[("ConfigMap", "tollgate")]["data"])
    assert secret_names >= set(docs[("Secret", "tollgate")]["stringData"]) - {
        "REDIS_URL",
        "CELERY_BROKER_URL",
    }
    stack = compose()
    for name, service in stack["services"].items():
        environment = service.get("environment") or {}
        plain = secret_names & set(environment)
        assert not plain, f"compose {name} sets {plain} in plain text (use *_FILE)"
        looks_secret = {var for var, value in environment.items() if is_credential(var, value)}
        assert not looks_secret, f"compose {name} sets {looks_secret} in plain text"
    example = (ROOT / "deploy/env.example").read_text().splitlines()
    in_example = dict(line.split("=", 1) for line in example if "=" in line and line[0] != "#")
    assert not secret_names & set(in_example), "deploy/.env would hold a credential"
    assert not [var for var, value in in_example.items() if is_credential(var, value)]
    # Every secret the entry point reads is a compose secret file in every container of the
    # image, so that none is left for deploy/.env (SENTRY_DSN, EMAIL_HOST_PASSWORD...).
    setup = (ROOT / "deploy/README.md").read_text()
    header = (ROOT / "deploy/docker-compose.yml").read_text().split("\nname:", 1)[0]
    for service_name, service in stack["services"].items():
        if service.get("image") != "tollgate:latest":
            continue
        for name in secret_names:
            path = service["environment"].get(name + "_FILE", "")
            assert path.startswith("/run/secrets/"), f"{service_name}: no {name}_FILE"
            secret = path.removeprefix("/run/secrets/")
            assert secret in service["secrets"], f"{service_name} does not mount {secret}"
            assert stack["secrets"][secret] == {"file": f"./secrets/{secret}"}
    for secret in stack["secrets"]:  # the documented setup creates every file
        assert f"> deploy/secrets/{secret}" in setup, secret
        assert f"> deploy/secrets/{secret}" in header, secret
    readme = (ROOT / "README.md").read_text()
    for name in secret_names:
        assert f"`{name}_FILE`" in readme


CREDENTIAL_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|DSN|API_KEY|WEBHOOK|CREDENTIAL")


def is_credential(name: str, value: object) -> bool:
    """A variable that carries a credential by its name, or a URL with a password in it
    (`scheme://user:password@host`); a `*_FILE` path to a secret carries none."""
    if name.endswith("_FILE"):
        return False
    return bool(CREDENTIAL_NAME.search(name) or re.search(r"://[^/@\s]*:[^/@\s]+@", str(value)))


def test_the_credential_check_catches_what_it_is_for():
    assert is_credential("SENTRY_DSN", "")
    assert is_credential("EMAIL_HOST_PASSWORD", "x")
    assert is_credential("BUDGET_ALERT_WEBHOOK_URL", "https://hooks.example/T0/abc")
    assert is_credential("POSTGRES_PASSWORD", "x")
    assert is_credential("GF_SECURITY_ADMIN_PASSWORD", "x")
    assert is_credential("REDIS_URL", "redis://:hunter2@redis:6379/0")
    assert is_credential("CELERY_BROKER_URL", "amqp://tollgate:hunter2@rabbit:5672//")
    assert not is_credential("SENTRY_DSN_FILE", "/run/secrets/sentry_dsn")
    assert not is_credential("GF_SECURITY_ADMIN_PASSWORD__FILE", "/run/secrets/grafana")
    assert not is_credential("REDIS_URL", "redis://redis:6379/0")
    assert not is_credential("ALLOWED_HOSTS", "localhost,127.0.0.1,web")


def test_every_probe_path_exists():
    from django.urls import resolve

    docs = k8s_docs()
    web = container_of(docs, "Deployment", "tollgate-web")
    paths = {
        web[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {"/health/startup", "/health/live", "/health/ready"}
    dockerfile = (ROOT / "Dockerfile").read_text()
    paths.add(dockerfile.split("http://127.0.0.1:8000", 1)[1].split('"', 1)[0])
    annotations = docs[("Deployment", "tollgate-web")]["spec"]["template"]["metadata"][
        "annotations"
    ]
    paths.add(annotations["prometheus.io/path"])
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    paths.add(prometheus["scrape_configs"][0]["metrics_path"])
    for path in paths:
        resolve(path)  # Resolver404 otherwise


def test_ports_agree_between_gunicorn_image_service_ingress_nginx_and_compose():
    port = 8000  # gunicorn.conf.py: 0.0.0.0:$PORT, PORT 8000
    assert "_int('PORT', 8000)" in (ROOT / "gunicorn.conf.py").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"PORT={port}" in dockerfile
    assert f"EXPOSE {port}" in dockerfile
    assert f"http://127.0.0.1:{port}/" in dockerfile
    docs = k8s_docs()
    web = container_of(docs, "Deployment", "tollgate-web")
    (container_port,) = web["ports"]
    assert (container_port["name"], container_port["containerPort"]) == ("http", port)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert web[probe]["httpGet"]["port"] in ("http", port)
    template = docs[("Deployment", "tollgate-web")]["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/port"] == str(port)
    (service_port,) = docs[("Service", "tollgate-web")]["spec"]["ports"]
    assert service_port["targetPort"] in ("http", port)
    backend = docs[("Ingress", "tollgate")]["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"]["name"] == "tollgate-web"
    assert backend["service"]["port"] in (
        {"name": service_port["name"]},
        {"number": service_port["port"]},
    )
    web_policy = docs[("NetworkPolicy", "tollgate-web-ingress")]["spec"]["ingress"][0]
    assert [p["port"] for p in web_policy["ports"]] == [port]
    nginx = (ROOT / "deploy/nginx/nginx.conf").read_text()
    assert f"server web:{port}" in nginx
    services = compose()["services"]
    assert services["web"]["expose"] == [str(port)]
    assert services["nginx"]["ports"] == ["${HTTP_PORT:-8080}:8080"]
    assert "listen 8080;" in nginx
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["dns_sd_configs"][0]["port"] == port


def test_migrations_run_before_the_web_serves():
    services = compose()["services"]
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert services["web"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    docs = k8s_docs()
    job = container_of(docs, "Job", "tollgate-migrate")
    assert job["args"] == ["python", "manage.py", "migrate", "--noinput"]
    # A web pod started before the Job has finished is not started until it has.
    web = container_of(docs, "Deployment", "tollgate-web")
    assert web["startupProbe"]["httpGet"]["path"] == "/health/startup"


def test_beat_is_one_replica_never_scaled():
    docs = k8s_docs()
    beat = docs[("Deployment", "tollgate-beat")]["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"  # never two during a rollout
    targets = {
        doc["spec"]["scaleTargetRef"]["name"]
        for (kind, _), doc in docs.items()
        if kind == "HorizontalPodAutoscaler"
    }
    assert targets == {"tollgate-web"}
    assert "deploy" not in compose()["services"]["beat"]  # no replicas to scale


def test_memory_requests_and_limits_fit_the_workers():
    docs = k8s_docs()
    config = docs[("ConfigMap", "tollgate")]["data"]
    web_pod = docs[("Deployment", "tollgate-web")]["spec"]["template"]["spec"]
    shm = sum(
        mib(v["emptyDir"]["sizeLimit"])
        for v in web_pod["volumes"]
        if v.get("emptyDir", {}).get("medium") == "Memory"
    )
    processes = {
        ("Deployment", "tollgate-web"): int(config["WEB_CONCURRENCY"]),
        ("Deployment", "tollgate-beat"): 0,
        ("Job", "tollgate-migrate"): 0,
    }
    worker = container_of(docs, "Deployment", "tollgate-worker")
    concurrency = [a for a in worker["args"] if a.startswith("--concurrency=")]
    processes[("Deployment", "tollgate-worker")] = int(concurrency[0].split("=")[1])
    for key, children in processes.items():
        resources = container_of(docs, *key)["resources"]
        # Children at their documented peak, plus the main process (the only one of beat
        # and of a migration, which is a whole Django process).
        needed = children * MIB_PER_WORKER + (MASTER_MIB if children else MIB_PER_WORKER)
        assert mib(resources["requests"]["memory"]) >= needed, key
        extra = shm if key[1] == "tollgate-web" else 0  # a memory emptyDir counts too
        assert mib(resources["limits"]["memory"]) >= needed + extra, key


def test_nginx_forwards_the_client_and_streams_and_bounds_bodies_like_the_app():
    nginx = (ROOT / "deploy/nginx/nginx.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in nginx
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in nginx
    # The port stays in Host, or an admin form posted to :8080 fails Django's Origin check.
    assert "proxy_set_header Host $http_host;" in nginx
    assert "proxy_buffering off;" in nginx
    body = nginx.split("client_max_body_size", 1)[1].split(";", 1)[0].strip()
    assert mib(body.replace("k", "Ki").replace("m", "Mi")) * 2**20 == settings.API_MAX_BODY_BYTES
    ingress = k8s_docs()[("Ingress", "tollgate")]["metadata"]["annotations"]
    size = ingress["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert mib(size.replace("k", "Ki").replace("m", "Mi")) * 2**20 == settings.API_MAX_BODY_BYTES
    assert ingress["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_network_policy_opens_what_the_web_needs():
    docs = k8s_docs()
    egress = docs[("NetworkPolicy", "tollgate-egress")]["spec"]
    assert egress["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "tollgate"}
    ports = {p["port"] for rule in egress["egress"] for p in rule.get("ports", [])}
    assert {53, 5432, 6379, 443} <= ports
    ingress = docs[("NetworkPolicy", "tollgate-web-ingress")]["spec"]["ingress"][0]
    sources = {
        s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for s in ingress["from"]
    }
    assert {"ingress-nginx", "monitoring"} <= sources  # the controller, and Prometheus


def test_the_documented_release_applies_the_migration_job_with_its_configmap():
    readme = (ROOT / "deploy/README.md").read_text()
    steps = [line for line in readme.splitlines() if line.startswith("kubectl ")]
    delete = steps.index("kubectl -n tollgate delete job tollgate-migrate --ignore-not-found")
    first = next(i for i, s in enumerate(steps) if s.startswith("kubectl apply -k") and " -l " in s)
    wait = next(i for i, s in enumerate(steps) if "wait --for=condition=complete" in s)
    rest = steps.index("kubectl apply -k deploy/k8s/base")
    assert delete < first < wait < rest
    selected = steps[first].split("in (", 1)[1].split(")", 1)[0].split(",")
    docs = k8s_docs()
    job = docs[("Job", "tollgate-migrate")]
    components = {job["metadata"]["labels"]["app.kubernetes.io/component"]}
    for source in container_of(docs, "Job", "tollgate-migrate")["envFrom"]:
        if "configMapRef" in source:
            config = docs[("ConfigMap", source["configMapRef"]["name"])]
            components.add(config["metadata"]["labels"]["app.kubernetes.io/component"])
    assert components == set(selected)
    timeout = int(steps[wait].rsplit("--timeout=", 1)[1].removesuffix("m")) * 60
    assert timeout >= job["spec"]["activeDeadlineSeconds"]


def test_alerts_measure_the_api_and_tollgates_own_latency():
    from django.urls import resolve

    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    rules = {rule["alert"]: rule["expr"] for group in alerts["groups"] for rule in group["rules"]}
    errors = rules["TollgateHighErrorRate"]
    assert errors.count('endpoint=~"/(api|v1)/.*"') == 2  # numerator and denominator
    for probe in ("/health/ready", "/metrics", "/api/v1/quota", "/v1/chat/completions"):
        endpoint = "/" + resolve(probe).route
        assert endpoint.startswith(("/api/", "/v1/")) is probe.startswith(("/api/", "/v1/"))
    latency = rules["TollgateHighLatencyP95"]
    excluded = latency.split('view!~"', 1)[1].split('"', 1)[0].split("|")
    waiting = {"/v1/chat/completions", "/api/v1/generate", "/api/v1/topics/subtopics"}
    waiting.add("/api/v1/topics/explanations")
    assert {resolve(path).view_name for path in waiting} == set(excluded)


def test_the_smtp_port_is_one_the_network_policy_opens():
    docs = k8s_docs()
    config = docs[("ConfigMap", "tollgate")]["data"]
    egress = docs[("NetworkPolicy", "tollgate-egress")]["spec"]["egress"]
    ports = {p["port"] for rule in egress for p in rule.get("ports", [])}
    assert int(config.get("EMAIL_PORT", settings.EMAIL_PORT)) in ports


def test_the_down_alert_names_the_scrape_job_of_compose_and_of_the_docs():
    alerts = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]["job_name"]
    assert f'up{{job="{job}"}}' in alerts
    assert f"in a job named `{job}`" in (ROOT / "deploy/README.md").read_text()


def test_the_images_collectstatic_gathers_swagger_uis_files():
    from django.contrib.staticfiles import finders

    final = (ROOT / "Dockerfile").read_text().split("\nFROM ")[-1]
    install = final.index("pip install --no-index")
    copy = final.index("COPY --chown=tollgate:tollgate . .")
    collect = final.index("manage.py collectstatic --noinput")
    assert install < collect
    assert copy < collect
    prod = (ROOT / "requirements/prod.txt").read_text()
    assert "-r base.txt" in prod
    assert "drf-spectacular-sidecar==" in (ROOT / "requirements/base.txt").read_text()
    assert "drf_spectacular_sidecar" in settings.INSTALLED_APPS
    assert finders.find("drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")
    assert "staticfiles" in (ROOT / ".dockerignore").read_text().split()  # built, not copied


def dockerfile_final_stage() -> tuple[dict[str, str], list[str]]:
    """The final stage's ENV, in order, and its RUN commands (continuation lines joined)."""
    final = (ROOT / "Dockerfile").read_text().split("\nFROM ")[-1].replace("\\\n", " ")
    environment: dict[str, str] = {}
    runs = []
    for line in final.splitlines():
        if line.startswith("ENV "):
            environment.update(item.split("=", 1) for item in shlex.split(line[4:]))
        elif line.startswith("RUN "):
            runs.append(line[4:])
    return environment, runs


def test_the_images_collectstatic_runs_in_the_environment_the_dockerfile_gives_it(tmp_path):
    # The build context (what .dockerignore lets through that matters here), the image's
    # /tmp as the build finds it (empty: the entry point, which prepares the metrics
    # directory, does not run at build time) and the final stage's ENV.
    app, image_tmp = tmp_path / "app", tmp_path / "tmp"
    image_tmp.mkdir()
    shutil.copytree(
        ROOT,
        app,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "staticfiles", "__pycache__", "*.pyc", ".*_cache", "db.sqlite3"
        ),
    )
    environment, runs = dockerfile_final_stage()
    (run,) = [r for r in runs if "manage.py collectstatic" in r]
    (command,) = [c for c in run.split("&&") if "manage.py collectstatic" in c]
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(app), "TMPDIR": str(image_tmp)}
    for name, value in environment.items():
        env[name] = re.sub(r"^/tmp(?=/|$)", str(image_tmp), value)
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith(str(image_tmp))  # as the image sets it

    built = subprocess.run(
        ["sh", "-c", command],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert built.returncode == 0, built.stdout + built.stderr
    swagger = app / "staticfiles/drf_spectacular_sidecar/swagger-ui-dist"
    assert (swagger / "swagger-ui-bundle.js").exists()
    assert list(image_tmp.iterdir()) == []  # no metrics file of the build left in the image


def pinned_requirements(path: Path) -> set[str]:
    """The distributions a requirements file pins (`name==version`), its `-r` files' too,
    by their normalised names."""
    names = set()
    for text in path.read_text().splitlines():
        line = text.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= pinned_requirements(path.parent / line[3:].strip())
        elif "==" in line:
            names.add(re.sub(r"[-_.]+", "-", line.split("==")[0].split("[")[0]).lower())
    return names


def test_every_third_party_module_the_code_imports_is_pinned():
    import ast
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    local = {p.stem for p in ROOT.iterdir() if p.is_dir() or p.suffix == ".py"}
    image = pinned_requirements(ROOT / "requirements/prod.txt")
    development = pinned_requirements(ROOT / "requirements/dev.txt")
    unpinned: dict[str, str] = {}  # a module, and a file that imports it
    for path in sorted(ROOT.glob("**/*.py")):
        parts = set(path.relative_to(ROOT).parts)
        if {".venv", "node_modules"} & parts:
            continue
        # The image runs the application; the tests, benchmarks and deployment checks run
        # from the development virtualenv.
        runtime = not {"tests", "bench", "deploy", "conftest.py"} & parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module]
            else:
                continue
            for module in (m.split(".")[0] for m in modules):
                if module in sys.stdlib_module_names or module in local:
                    continue
                names = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions[module]}
                if not names & (image if runtime else development):
                    unpinned.setdefault(module, str(path.relative_to(ROOT)))
    assert unpinned == {}

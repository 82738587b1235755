# Tollgate: `make run` for a first look (SQLite, in-process cache and quotas, offline
# provider), `make test` for the whole suite against real PostgreSQL and Redis.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev run test lint lint-deploy format migrate bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-prod: requirements/base.txt requirements/prod.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/prod.txt
	touch $@

$(VENV)/.installed-dev: requirements/base.txt requirements/dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

# promtool checks and unit-tests the alert rules (taken from Debian's package: see the script).
$(BIN)/promtool: deploy/install-promtool.sh | $(BIN)/python
	deploy/install-promtool.sh $@

install: $(VENV)/.installed-prod
install-dev: $(VENV)/.installed-dev $(BIN)/promtool

migrate: install
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py migrate --noinput

run: migrate
	@DEBUG=$${DEBUG:-1} $(BIN)/python manage.py seed_demo --base-url http://$(HOST):$(PORT)
	DEBUG=$${DEBUG:-1} $(BIN)/python manage.py runserver $(HOST):$(PORT)

test: install-dev
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	SECRET_KEY=lint-only $(BIN)/mypy .
	$(MAKE) lint-deploy

# Deployment artifacts: Dockerfile, shell scripts, every YAML file, the Kubernetes
# manifests, the alert rules (checked and unit-tested by promtool), and the metrics named
# by the alert rules and the dashboard.
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard deploy/k8s/*/*.yaml))
PROMETHEUS_RULES := deploy/prometheus/alerts.yml
PROMETHEUS_RULE_TESTS := $(wildcard deploy/prometheus/tests/*.yml)
lint-deploy: install-dev
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck deploy/backup/*.sh deploy/docker-entrypoint.sh deploy/install-promtool.sh
	$(BIN)/yamllint --strict -c .yamllint.yml .
	$(BIN)/kubernetes-validate --strict --quiet $(K8S_MANIFESTS)
	$(BIN)/promtool check rules $(PROMETHEUS_RULES)
	$(BIN)/promtool test rules $(PROMETHEUS_RULE_TESTS)
	SECRET_KEY=$${SECRET_KEY:-lint-only} $(BIN)/python deploy/check_metrics.py

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install-dev
	$(BIN)/python bench/admission.py

clean:
	rm -rf $(VENV) db.sqlite3 staticfiles

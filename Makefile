# Tollgate: `make run` for a first look (SQLite, in-process cache and quotas, offline
# provider), `make test` for the whole suite against real PostgreSQL and Redis.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev run serve test lint lint-deploy format migrate bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-prod: requirements/base.txt requirements/prod.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/prod.txt
	touch $@

$(VENV)/.installed-dev: requirements/base.txt requirements/dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

# promtool checks and unit-tests the alert rules. It is the one file taken from Debian's
# `prometheus` package: installing the package would set up and start a Prometheus service.
# `apt-get download` needs no root but needs the package lists; on a fresh machine (no
# lists, or lists older than the mirror's package) root refreshes them once and retries.
# The binary is checked to run before it is moved into place, so a failure leaves nothing
# behind and the next `make` tries again.
$(BIN)/promtool: | $(BIN)/python
	@set -eu; \
	command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { \
	  echo "promtool: needs apt-get and dpkg-deb (Debian, Ubuntu); or put promtool 2.x at $@" >&2; \
	  exit 1; }; \
	tmp=$$(mktemp -d "$(VENV)/.promtool.XXXXXX"); trap 'rm -rf "$$tmp"' EXIT; \
	download() { (cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User="$$(id -un)" prometheus); }; \
	if ! download; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "promtool: apt-get download prometheus failed: run 'sudo apt-get update', then make" >&2; \
	    exit 1; \
	  fi; \
	  echo "promtool: apt-get update, then downloading again"; \
	  apt-get update -qq && download || { \
	    echo "promtool: apt-get download prometheus failed after an update (mirror unreachable?)" >&2; \
	    exit 1; }; \
	fi; \
	dpkg-deb --fsys-tarfile "$$tmp"/prometheus_*.deb | tar -x -C "$$tmp" ./usr/bin/promtool; \
	version=$$("$$tmp/usr/bin/promtool" --version 2>&1) || { \
	  echo "promtool: the extracted binary does not run: $$version" >&2; exit 1; }; \
	mv "$$tmp/usr/bin/promtool" $@; \
	echo "$$version" | head -n 1

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
	$(BIN)/shellcheck deploy/backup/*.sh deploy/docker-entrypoint.sh
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

#!/usr/bin/env python
"""Check that every metric named in the Prometheus alert rules and the Grafana dashboards
is one the service exports.

The exported names are read from the metric registry after importing the project's own
metrics (health/metrics.py) and django-prometheus's (HTTP, database, cache, migrations),
expanded the way the text format names samples (a counter `x` is `x_total`, a histogram
`x_bucket`/`x_sum`/`x_count`...). Names are taken from each PromQL expression by dropping
strings, label matchers, grouping clauses and ranges, then keeping the identifiers that
are neither functions nor keywords. `up` is Prometheus's own per-target sample.

    python deploy/check_metrics.py [--rules FILE ...] [--dashboards FILE ...]

Exit status 0 when every name is exported, 1 otherwise (each unknown name is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = [ROOT / "deploy/prometheus/alerts.yml"]
DEFAULT_DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
# Samples Prometheus itself attaches to every scrape target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "le",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression refers to."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text, flags=re.IGNORECASE)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def rule_expressions(path: Path) -> Iterator[tuple[str, str]]:
    data = yaml.safe_load(path.read_text())
    for group in data.get("groups", []):
        for rule in group.get("rules", []):
            label = rule.get("alert") or rule.get("record") or "?"
            yield f"{path.name}:{label}", str(rule["expr"])


def dashboard_expressions(path: Path) -> Iterator[tuple[str, str]]:
    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            title = node.get("title", where)
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    yield f"{path.name}:{title}", value
                else:
                    yield from walk(value, title)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)

    yield from walk(json.loads(path.read_text()), path.name)


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gauge": ("",),
    "unknown": ("",),
}


def exported_names() -> set[str]:
    """Every sample name the service's registry can expose."""
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("SECRET_KEY", "metrics-check-only")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    import importlib

    from prometheus_client import REGISTRY

    importlib.import_module("health.metrics")
    from django_prometheus.middleware import Metrics

    Metrics.get_instance()
    for module in (
        "django_prometheus.db.metrics",
        "django_prometheus.cache.metrics",
        "django_prometheus.models",
        "django_prometheus.migrations",
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def check(expressions: Iterable[tuple[str, str]], exported: set[str]) -> list[str]:
    problems = []
    for where, expr in expressions:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        for name in sorted(names - exported - PROMETHEUS_SYNTHETIC):
            problems.append(f"{where}: {name} is not exported by the service")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="*", type=Path, default=DEFAULT_RULES)
    parser.add_argument("--dashboards", nargs="*", type=Path, default=DEFAULT_DASHBOARDS)
    args = parser.parse_args(argv)
    expressions = [e for p in args.rules for e in rule_expressions(p)]
    expressions += [e for p in args.dashboards for e in dashboard_expressions(p)]
    problems = check(expressions, exported_names())
    for problem in problems:
        print(problem, file=sys.stderr)  # noqa: T201
    if not problems:
        print(f"check_metrics: {len(expressions)} expressions, every metric is exported")  # noqa: T201
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""What the outside can reach: the Kubernetes Ingress and the compose nginx route the public
paths only, never /metrics or the readiness and startup probes. Both are read from their
files and matched the way their controllers match (Ingress `Exact`/`Prefix`; nginx's exact,
prefix and regex locations), against every route the application serves."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from django.conf import settings

from config.tests.test_deploy_lint import k8s_docs

ROOT = Path(settings.BASE_DIR)
# Operator-only: Prometheus scrapes each pod or replica directly, the kubelet and Docker's
# HEALTHCHECK probe the container itself. /health/live stays public for uptime checks.
PRIVATE = ("/metrics", "/health/ready", "/health/startup")
PUBLIC = (
    "/api/v1/generate",
    "/api/v1/quota",
    "/api/schema/",
    "/api/docs/",
    "/v1/chat/completions",
    "/admin/",
    "/admin/login/",
    "/static/admin/css/base.css",
    "/health/live",
)


def served_paths() -> set[str]:
    """One path per route of the URLconf (converters filled in); regex routes (the admin's
    app index, the API's 404 catch-all) are left out."""
    from django.urls import URLResolver, get_resolver
    from django.urls.resolvers import RoutePattern

    def walk(patterns: list, prefix: str):
        for entry in patterns:
            if not isinstance(entry.pattern, RoutePattern):
                continue
            route = prefix + re.sub(r"<[^>]+>", "x", str(entry.pattern))
            if isinstance(entry, URLResolver):
                yield from walk(entry.url_patterns, route)
            else:
                yield "/" + route

    return set(walk(get_resolver().url_patterns, ""))


def is_private(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PRIVATE)


# --- Kubernetes Ingress ------------------------------------------------------------------


@functools.cache
def ingress() -> dict:
    return k8s_docs()[("Ingress", "tollgate")]


def ingress_backend(path: str) -> dict | None:
    """The backend of the Ingress path that takes `path` (the Ingress spec's matching: an
    Exact match first, then the longest element-wise Prefix), None for the controller's
    default backend."""
    best: tuple[int, dict] | None = None
    for rule in ingress()["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            rule_path, kind = entry["path"], entry["pathType"]
            assert kind in ("Exact", "Prefix"), "ImplementationSpecific matches differently"
            if kind == "Exact" and path == rule_path:
                return entry["backend"]
            trimmed = rule_path.rstrip("/")
            matches = kind == "Prefix" and (path == trimmed or path.startswith(trimmed + "/"))
            if matches and (best is None or len(trimmed) > best[0]):
                best = (len(trimmed), entry["backend"])
    return best[1] if best else None


def test_ingress_routes_no_operator_only_path():
    for path in (*PRIVATE, "/metrics/", "/health/", "/health/ready/", "/"):
        assert ingress_backend(path) is None, path


def test_ingress_routes_every_public_path_to_the_web_service():
    for path in PUBLIC:
        backend = ingress_backend(path)
        assert backend is not None, path
        assert backend["service"]["name"] == "tollgate-web"


def test_ingress_routes_every_application_route_unless_operator_only():
    served = served_paths()
    assert {"/metrics", "/health/ready", "/health/startup", "/health/live"} <= served
    assert any(p.startswith("/admin/") for p in served)
    for path in served:
        assert (ingress_backend(path) is not None) is not is_private(path), path


def test_ingress_keeps_unmatched_paths_on_the_controllers_404():
    spec = ingress()["spec"]
    annotations = ingress()["metadata"].get("annotations", {})
    # A defaultBackend would take every unlisted path (/metrics among them) to its service.
    assert "defaultBackend" not in spec
    # Snippets are off by default in ingress-nginx; regex paths would change the matching.
    assert not [a for a in annotations if a.endswith("-snippet")]
    assert "nginx.ingress.kubernetes.io/use-regex" not in annotations
    assert "nginx.ingress.kubernetes.io/rewrite-target" not in annotations


def test_prometheus_scrapes_the_pods_directly_not_through_the_ingress():
    docs = k8s_docs()
    pod = docs[("Deployment", "tollgate-web")]["spec"]["template"]["metadata"]
    assert pod["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["annotations"]["prometheus.io/path"] == "/metrics"
    policy = docs[("NetworkPolicy", "tollgate-web-ingress")]["spec"]["ingress"][0]
    sources = {
        s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in policy["from"]
    }
    assert "monitoring" in sources


# --- compose nginx -----------------------------------------------------------------------


@functools.cache
def nginx_locations() -> list[tuple[str, str, str]]:
    """(modifier, pattern, body) of each location of the server block, in order."""
    conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    conf = re.sub(r"#[^\n]*", "", conf)
    found = re.findall(r"location\s+(=|\^~|~\*?)?\s*(\S+)\s*\{([^{}]*)\}", conf)
    assert len(found) == conf.count("location "), "a location this test cannot read"
    return found


def nginx_location(path: str) -> str:
    """The body of the location nginx picks for `path`: an exact match, else the longest
    prefix if it is `^~`, else the first matching regex, else the longest prefix."""
    locations = nginx_locations()
    for modifier, pattern, body in locations:
        if modifier == "=" and path == pattern:
            return body
    prefixes = [(p, m, b) for m, p, b in locations if m in ("", "^~") and path.startswith(p)]
    longest = max(prefixes, key=lambda x: len(x[0]), default=None)
    if longest and longest[1] == "^~":
        return longest[2]
    for modifier, pattern, body in locations:
        flags = re.IGNORECASE if modifier == "~*" else 0
        if modifier in ("~", "~*") and re.search(pattern, path, flags):
            return body
    assert longest, f"no location for {path}"
    return longest[2]


def nginx_proxies(path: str) -> bool:
    body = nginx_location(path)
    assert ("proxy_pass" in body) is not ("return 404" in body), body
    return "proxy_pass http://tollgate" in body


def test_nginx_serves_no_operator_only_path():
    for path in (*PRIVATE, "/metrics/", "/health/", "/health/ready/", "/"):
        assert not nginx_proxies(path), path


def test_nginx_proxies_every_public_path_and_every_application_route_unless_operator_only():
    for path in PUBLIC:
        assert nginx_proxies(path), path
    for path in served_paths():
        assert nginx_proxies(path) is not is_private(path), path


def test_nginx_and_the_ingress_route_the_same_paths():
    samples = served_paths() | set(PUBLIC) | {"/api", "/v1", "/admin", "/apix", "/static/x"}
    for path in samples:
        assert nginx_proxies(path) is (ingress_backend(path) is not None), path

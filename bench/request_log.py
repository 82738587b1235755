"""What the request middleware costs per request: request id, metrics counter, and the JSON
request log line (written to /dev/null here).

    python bench/request_log.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.http import HttpRequest, HttpResponse
    from django.test import RequestFactory
    from django.urls import resolve

    from config.middleware import RequestIdMiddleware

    with open(os.devnull, "w") as sink:  # noqa: PTH123
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sink)

        def view(request: HttpRequest) -> HttpResponse:
            return HttpResponse(b"{}", content_type="application/json")

        middleware = RequestIdMiddleware(view)
        factory = RequestFactory()

        def per_request_us(path: str, handler) -> float:
            match = resolve(path)
            requests = [factory.get(path) for _ in range(args.requests)]
            for request in requests:
                request.resolver_match = match
            started = time.perf_counter()
            for request in requests:
                handler(request)
            return (time.perf_counter() - started) / args.requests * 1e6

        rounds = {"bare": [], "probe": [], "logged": []}
        for _ in range(5):
            rounds["bare"].append(per_request_us("/health/live", view))
            rounds["probe"].append(per_request_us("/health/live", middleware))
            rounds["logged"].append(per_request_us("/api/v1/quota", middleware))
    bare, probe, logged = (statistics.median(rounds[k]) for k in ("bare", "probe", "logged"))
    print(f"median of 5 rounds of {args.requests} requests (per request):")
    print(f"  the view alone                                  : {bare:6.1f} us")
    print(f"  + request id and counter (probe, no log line)   : {probe - bare:6.1f} us")
    print(f"  + request id, counter and JSON request log line : {logged - bare:6.1f} us")


if __name__ == "__main__":
    main()

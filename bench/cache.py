"""Cache tier: layer latencies, and cache-hit throughput through gunicorn against a bare view.

    python bench/cache.py [--gets 20000] [--duration 10] [--connections 16] [--worker-class sync]
                           [--memory-layer on|off]

1. Memory-layer and Redis-layer `cache_get` latency (p50/p99), in this process.
2. Two gunicorn workers (the repository's gunicorn.conf.py; sync unless --worker-class says
   otherwise), loaded by wrk with `--connections`
   connections for `--duration` seconds each, in the same run:
   - a bare Django view returning a constant JSON body (the whole middleware stack), then
   - POST /api/v1/generate answered from the cache: API-key authentication, validation,
     memory-layer hit, admission counting the request (one Redis round trip), the hit's
     ledger row (batched), rate-limit headers;
   and their ratio (DESIGN.md's budget: a hit at least 60% of the bare view); with
   `--memory-layer off` the server keeps nothing in memory, so every hit is found in
   Redis (by the admission script that counts it), and the analysis rows are left out;
   - for analysis, the same hit without DRF's dispatch (bench/minimal-hit), with the Redis
     call that counts the request made for one hit in 8 only (what leasing blocks of 8
     request slots could reach at best), and without it (bench/minimal-hit-uncounted).

Uses its own PostgreSQL database (BENCH_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/tollgate_bench_cache) and Redis keys under the prefix
`tgbench` in REDIS_URL's database. Needs `wrk` (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import LOCAL_MODEL, ensure_database, unlimited_principal  # noqa: E402

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/tollgate_bench_cache"
APP = "bench.cache:application"

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/2")
os.environ.setdefault("SECRET_KEY", "bench-only")
os.environ["REDIS_KEY_PREFIX"] = "tgbench"
os.environ.setdefault("LOG_LEVEL", "WARNING")


def _minimal_hit_view(*, count_every: int) -> Any:
    """For analysis only: the work of a cache hit on POST /api/v1/generate without DRF's
    dispatch, serializer and idempotency layer (API-key authentication, the body, the
    canonical key, the memory-layer hit, the response), with the admission call that counts
    the request in Redis on every hit (`count_every=1`), on one hit in `count_every` (the
    best a worker leasing blocks of that many request slots could do; every hit still
    writes its ledger row), or never (0, and no ledger row). They show what the view's
    framework costs and what the per-request count costs."""
    import dataclasses
    import itertools

    from django.http import JsonResponse
    from django.views.decorators.csrf import csrf_exempt

    from caching.services import cache_get, cache_key_generation
    from generation.services.completion import Outcome, completion_body
    from quotas.authentication import ApiKeyAuthentication
    from quotas.services import admission_count_hit, policy_get, usage_record_hit

    auth = ApiKeyAuthentication()
    hits = itertools.count()
    last: list[Any] = []  # the admission of the last counted hit

    @csrf_exempt
    def view(request: HttpRequest) -> JsonResponse:
        user, principal = auth.authenticate(request)  # type: ignore[arg-type,misc]
        data = json.loads(request.body)
        model = data["model"]
        policy = policy_get(user_id=user.pk, key_id=principal.id, model=model)
        key = cache_key_generation(
            model=model,
            messages=[{"role": "user", "content": data["prompt"]}],
            params={
                "max_tokens": min(256, policy.max_output_tokens),
                "temperature": None,
                "task": "chat",
            },
        )
        hit = cache_get(key)
        assert hit is not None  # noqa: S101 - the bench stores the answer first
        request_id: str = request.request_id  # type: ignore[attr-defined]
        headers: dict[str, str] = {}
        if count_every:
            if next(hits) % count_every == 0 or not last:
                last[:] = [
                    admission_count_hit(
                        user_id=user.pk, key_id=principal.id, model=model, request_id=request_id
                    )
                ]
            admission = dataclasses.replace(last[0], request_id=request_id)
            usage_record_hit(admission=admission)
            headers = admission.headers()
        outcome = Outcome(
            value=hit.value, model=model, cache="HIT", cache_layer=hit.layer, headers=headers
        )
        response = JsonResponse(completion_body(outcome, request_id=request_id))
        for name, value in {**headers, "X-Cache": "HIT"}.items():
            response[name] = value
        return response

    return view


if os.environ.get("BENCH_CACHE_WSGI") == "1":
    # Loaded by gunicorn as `bench.cache:application`: the project's URLs plus the bare view.
    from django.core.wsgi import get_wsgi_application

    application = get_wsgi_application()

    from django.conf import settings
    from django.http import HttpRequest, JsonResponse
    from django.urls import path

    from config.urls import urlpatterns as project_urls

    def bare(request: HttpRequest) -> JsonResponse:
        return JsonResponse({"status": "ok", "answer": 42})

    urlpatterns = [
        path("bench/bare", bare),
        path("bench/minimal-hit", _minimal_hit_view(count_every=1)),
        path("bench/minimal-hit-counted-1-in-8", _minimal_hit_view(count_every=8)),
        path("bench/minimal-hit-uncounted", _minimal_hit_view(count_every=0)),
        *project_urls,
    ]
    settings.ROOT_URLCONF = "bench.cache"


def _pcts(samples_ns: list[int]) -> tuple[float, float]:
    samples = sorted(samples_ns)
    p50 = statistics.median(samples) / 1000
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000
    return p50, p99


def layer_latencies(gets: int) -> dict[str, tuple[float, float]]:
    """p50/p99 in microseconds of a memory hit and of a Redis hit (memory layer off)."""
    from django.conf import settings

    from caching.services import cache_get, cache_local_reset, cache_set

    value = {"text": "x" * 400, "finish_reason": "stop", "usage": {"prompt_tokens": 9}}
    cache_local_reset()
    cache_set("gen:bench-memory", value)
    out = {}
    samples = []
    for _ in range(gets):
        t0 = time.perf_counter_ns()
        hit = cache_get("gen:bench-memory")
        samples.append(time.perf_counter_ns() - t0)
        assert hit is not None
        assert hit.layer == "memory"
    out["memory"] = _pcts(samples)

    settings.CACHE_MEMORY_MAX_SIZE = 0  # every look-up goes to Redis
    cache_local_reset()
    samples = []
    for _ in range(max(1, gets // 4)):
        t0 = time.perf_counter_ns()
        hit = cache_get("gen:bench-memory")
        samples.append(time.perf_counter_ns() - t0)
        assert hit is not None
        assert hit.layer == "redis"
    out["redis"] = _pcts(samples)
    settings.CACHE_MEMORY_MAX_SIZE = 1000
    cache_local_reset()
    return out


def setup_account() -> str:
    """Migrate the bench database; a model, a plan without practical limits, a user, a key."""
    from quotas.models import ApiKey
    from quotas.services import key_create

    user = unlimited_principal(
        username="bench-cache", plan="bench", model="local/demo", model_fields=LOCAL_MODEL
    )
    ApiKey.objects.filter(user=user).delete()
    full_key, _ = key_create(user=user, name="bench")
    return full_key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_up(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"gunicorn did not come up at {url}")


def _wrk(url: str, *, duration: int, connections: int, script: Path | None) -> dict:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", text, re.MULTILINE))
    return {
        "rps": rps,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "p50": lat.get("50"),
        "p99": lat.get("99"),
    }


def http_ratio(
    full_key: str, *, duration: int, connections: int, worker_class: str, memory_layer: bool
) -> dict:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "BENCH_CACHE_WSGI": "1",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "GUNICORN_WORKER_CLASS": worker_class,
        "GUNICORN_LOG_LEVEL": "warning",
        "DEBUG": "0",
        "SECURE_SSL_REDIRECT": "0",  # TLS ends at the proxy in front; loopback here
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="tgbench-prom-"),
    }
    if not memory_layer:  # every hit is found in Redis, as by a worker new to the answer
        env["CACHE_MEMORY_MAX_SIZE"] = "0"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "bench.cache:application",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_up(base + "/bench/bare")
        body = json.dumps({"prompt": "What is a cache?", "model": "local/demo"})
        headers = {"Authorization": f"Bearer {full_key}", "Content-Type": "application/json"}
        for expected in ("MISS", "HIT"):  # store the answer; then both workers hit
            req = urllib.request.Request(base + "/api/v1/generate", body.encode(), headers)
            with urllib.request.urlopen(req) as resp:  # noqa: S310 - loopback
                assert resp.headers["X-Cache"] in (expected, "HIT"), resp.headers["X-Cache"]
        script = Path(tempfile.mkstemp(suffix=".lua")[1])
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            f'wrk.headers["Authorization"] = "Bearer {full_key}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        _wrk(base + "/bench/bare", duration=2, connections=connections, script=None)  # warm-up
        bare = _wrk(base + "/bench/bare", duration=duration, connections=connections, script=None)
        hit = _wrk(
            base + "/api/v1/generate", duration=duration, connections=connections, script=script
        )
        analysis = ("minimal-hit", "minimal-hit-counted-1-in-8", "minimal-hit-uncounted")
        minimal = {
            name: _wrk(
                f"{base}/bench/{name}", duration=duration, connections=connections, script=script
            )
            for name in (analysis if memory_layer else ())
        }
        script.unlink()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return {"bare": bare, "hit": hit, **minimal, "ratio": hit["rps"] / bare["rps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gets", type=int, default=20000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--worker-class", default="sync", help="gunicorn worker class")
    parser.add_argument(
        "--memory-layer",
        choices=("on", "off"),
        default="on",
        help="off: the server keeps no answer in memory, so every hit is found in Redis",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    ensure_database(os.environ["DATABASE_URL"])

    import django

    django.setup()
    from caching.tier import tier

    full_key = setup_account()
    for batch in tier().scan_matching("*"):
        tier().redis.unlink(*batch)

    layers = layer_latencies(args.gets)
    for name, (p50, p99) in layers.items():
        print(f"{name:>6} layer get: p50 {p50:7.1f} us  p99 {p99:7.1f} us")
    result = http_ratio(
        full_key,
        duration=args.duration,
        connections=args.connections,
        worker_class=args.worker_class,
        memory_layer=args.memory_layer == "on",
    )
    names = ("bare", "hit", "minimal-hit", "minimal-hit-counted-1-in-8", "minimal-hit-uncounted")
    for name in (n for n in names if n in result):
        r = result[name]
        print(
            f"{name:>26}: {r['rps']:8.0f} req/s ({r['rps'] / result['bare']['rps']:4.0%})  "
            f"p50 {r['p50']}  p99 {r['p99']}  non-2xx {r['non2xx']}"
        )
    print(f"cache hit / bare view: {result['ratio']:.0%}")


if __name__ == "__main__":
    main()

"""Cache-miss generation requests through gunicorn against the zero-latency fake upstream.

    .venv/bin/python bench/generate.py [--duration 6] [--concurrency 1 8 32] [--rounds 1]
                                       [--workers 2] [--worker-class sync] [--write-docs]
    .venv/bin/python bench/generate.py --profile 300      # pyinstrument of the hot path
    .venv/bin/python bench/generate.py --breakdown 500    # CPU and wall of each step
    .venv/bin/python bench/generate.py --instructions 250  # CPU instructions per request
    .venv/bin/python bench/generate.py --upstream-port 18778 --reference \
        http://127.0.0.1:4000/v1/chat/completions --reference-key KEY --reference-pid PID
    BENCH_CPROFILE=1 .venv/bin/python bench/generate.py --profile 2000
        # cProfile instead: BENCH_CPROFILE_GROUP=1 sums it by package, BENCH_CPROFILE_OUT=F
        # dumps its stats to F, BENCH_CPROFILE_SORT / _LINES choose the printed table

Starts the fake upstream (generation/tests/fake_upstream.py, its own process), then
Tollgate under gunicorn (the repository's gunicorn.conf.py, 2 workers unless --workers says
otherwise, sync unless --worker-class does: at zero upstream latency the cheapest) with the
OpenAI-compatible provider pointed at it, and drives both with wrk at each concurrency:

- through Tollgate: POST /api/v1/generate, every prompt unique (always a cache miss), with
  an API key whose plan, key and global limits are all set (every window is checked and
  reserved) and the ledger on;
- straight to the fake upstream: POST /v1/chat/completions with the body Tollgate sends.

Overhead = (through Tollgate) - (straight to the upstream), both measured in the same run:
p50 - the upstream's p50, and p99 - the upstream's p50 (two p99s need not come from the
same requests, and the fake upstream's own tail made their difference go negative).
--rounds N runs the floor and every point N times, one after the other, and reports the
median of each column: on a noisy machine one run of the same code differs from the next
by up to 20%.
CPU per request is the gunicorn workers' user+system CPU time over the run divided by the
requests served; peak RSS is each worker's VmHWM.
--reference URL measures another OpenAI-compatible gateway instead of Tollgate, with the
same fake upstream (at --upstream-port, where that gateway was told to send model
--reference-model), wrk script and points: its chat completions URL, its key, and the
process whose descendants serve it (CPU and peak RSS are theirs). There is no floor row.
--instructions N counts the instructions one request executes in a process set up as a
gunicorn worker is (the `post_worker_init` hook), calling the WSGI application as gunicorn
does: valgrind's cachegrind runs the loop once with N/5 requests and once with N, and the
difference divided by the 4N/5 extra requests leaves out start-up. Unlike seconds, the count
does not change with what else the machine is doing, so it shows a change of a few percent
that timings on a shared machine cannot; it leaves out waiting (Redis, PostgreSQL, the
upstream) and gunicorn's own HTTP parsing. The loop's clock is simulated: `time.time`,
`time.monotonic` and `time.perf_counter` advance 3 ms per request (as at about 300
requests/s) and a microsecond per reading, whatever valgrind's slowdown. With the real
clock, a request under valgrind takes tens of times longer than natively, so the work done
once per period (the API-key cache of a second, the breaker's closed state trusted for
0.25 s, the cache tier's invalidation poll) was counted every few requests instead of every
few hundred, and by how much depended on the machine's load. --scenario counts one kind
only. Own database `tollgate_bench_gen` and Redis db 1 (override with DATABASE_URL /
REDIS_URL).
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
from bench.common import BIG, ensure_database, unlimited_principal  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/tollgate_bench_gen")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/1")
os.environ.setdefault("CELERY_BROKER_URL", os.environ["REDIS_URL"])
os.environ.setdefault("SECRET_KEY", "bench-only")
os.environ.setdefault("LOG_LEVEL", "WARNING")
MODEL = "bench/gpt"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- generation-bench:start -->", "<!-- generation-bench:end -->"

WRK_SCRIPT = r"""
local counter = 0
local tid = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  tid = tonumber(tid) or 0
  math.randomseed(os.time() + tid * 7919)
end
request = function()
  counter = counter + 1
  if BODY_FORMAT == "" then return wrk.format(METHOD) end
  local body = string.format(BODY_FORMAT, tid, counter, math.random(1, 1000000000))
  return wrk.format(METHOD, nil, nil, body)
end
not_ok = 0
function response(status, headers, body)
  if status ~= 200 then not_ok = not_ok + 1 end
end
function done(summary, latency, requests)
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + (thread:get("not_ok") or 0) end
  local errors = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"mean_us": %d, "non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, failed, errors.connect + errors.read + errors.write + errors.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback only
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def gunicorn_start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """gunicorn serving Tollgate with the repository's gunicorn.conf.py (read from the
    working directory), configured by `env`."""
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("gunicorn")), "config.wsgi"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def setup_database() -> str:
    """Create the bench database if needed, migrate, and return a key with every limit set."""
    ensure_database(os.environ["DATABASE_URL"])
    import django

    django.setup()
    from quotas import services

    user = unlimited_principal(
        username="bench-generate",
        plan="bench-generate",
        model=MODEL,
        model_fields={
            "provider": "openai",
            "upstream_model": "gpt-bench",
            "input_per_million": "0.15",
            "output_per_million": "0.60",
            "context_window": 128000,
            "max_output_tokens": 4096,
        },
    )
    full_key, _ = services.key_create(
        user=user, name="bench", requests_per_minute=BIG, tokens_per_minute=BIG * 1000
    )
    from django_redis import get_redis_connection

    get_redis_connection("default").flushdb()
    return full_key


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mib(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def wrk(
    url: str,
    *,
    body_format: str,
    headers: dict[str, str],
    concurrency: int,
    duration: float,
    method: str = "POST",
) -> dict[str, float]:
    script = WRK_SCRIPT.replace("BODY_FORMAT", json.dumps(body_format)).replace(
        "METHOD", json.dumps(method)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        path = f.name
    cmd = [
        "wrk",
        "-t",
        str(min(2, concurrency)),
        "-c",
        str(concurrency),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        path,
    ]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    os.unlink(path)
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=1, help="repeat, report the medians")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument(
        "--worker-class",
        default="sync",
        help="gunicorn worker class (gthread: GUNICORN_THREADS each, default 4)",
    )
    parser.add_argument("--profile", type=int, default=0, help="profile N in-process requests")
    parser.add_argument(
        "--breakdown", type=int, default=0, help="CPU of each step of the path, N times each"
    )
    parser.add_argument(
        "--instructions",
        type=int,
        default=0,
        help="instructions per request of each kind, N requests (valgrind)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="with --instructions: count this kind only (repeatable)",
    )
    parser.add_argument("--upstream-port", type=int, default=0, help="the fake upstream's port")
    parser.add_argument("--reference", default="", help="another gateway's chat completions URL")
    parser.add_argument("--reference-key", default="", help="its API key")
    parser.add_argument("--reference-model", default=MODEL, help="its name for the fake model")
    parser.add_argument("--reference-pid", type=int, default=0, help="its serving process")
    parser.add_argument("--loop", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:  # one run under valgrind, started by --instructions
        loop(args.loop, args.count)
        return
    if args.instructions and not shutil.which("valgrind"):
        sys.exit("valgrind is required (apt-get install valgrind)")
    if not shutil.which("wrk") and not (args.profile or args.breakdown or args.instructions):
        sys.exit("wrk is required (apt-get install wrk)")
    if args.reference and not args.reference_pid:
        sys.exit("--reference needs --reference-pid (the process that serves it)")

    key = setup_database()
    up_port, gw_port = args.upstream_port or free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
        "OPENAI_API_KEY": "sk-bench",
        "GUNICORN_BIND": f"127.0.0.1:{gw_port}",
        "WEB_CONCURRENCY": str(args.workers),
        "GUNICORN_WORKER_CLASS": args.worker_class,
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="tollgate-bench-prom-"),
        "PYTHONPATH": str(ROOT),
    }
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "generation.tests.fake_upstream", str(up_port)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        )
        wait_http(f"http://127.0.0.1:{up_port}/")
        if args.profile:
            profile(args.profile, key, env)
            return
        if args.breakdown:
            breakdown(args.breakdown, key, env)
            return
        if args.instructions:
            sys.stdout.write(instructions(args.instructions, key, env, args.scenario) + "\n")
            return
        if args.reference:
            results = run_all(args, key, up_port, gw_port, args.reference_pid)
            table = render(results, args.duration, "", args.rounds, reference=args.reference)
            sys.stdout.write(table + "\n")
            return
        gunicorn = gunicorn_start(env)
        procs.append(gunicorn)
        wait_http(f"http://127.0.0.1:{gw_port}/health/live")
        results = run_all(args, key, up_port, gw_port, gunicorn.pid)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
    table = render(results, args.duration, args.worker_class, args.rounds, args.workers)
    sys.stdout.write(table + "\n")
    if args.write_docs:
        write_docs(table)


def run_all(
    args: argparse.Namespace, key: str, up_port: int, gw_port: int, master: int
) -> list[dict[str, float]]:
    gw_body = '{"prompt": "bench %d-%d-%d: explain caching", "model": "' + MODEL + '"}'
    up_body = (
        '{"model": "gpt-bench", "messages": [{"role": "user", "content": '
        '"bench %d-%d-%d: explain caching"}], "max_tokens": 256}'
    )
    # As behind the TLS-terminating proxy of deploy/nginx (else: a redirect to https).
    gw_headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "X-Forwarded-Proto": "https",
    }
    up_headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    gw_url = f"http://127.0.0.1:{gw_port}/api/v1/generate"
    up_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
    floor_url: str | None = f"http://127.0.0.1:{gw_port}/health/live"
    if args.reference:  # the same chat request, to the other gateway
        gw_url, floor_url = args.reference, None
        gw_body = up_body.replace('"gpt-bench"', json.dumps(args.reference_model))
        gw_headers = {
            "Authorization": f"Bearer {args.reference_key}",
            "Content-Type": "application/json",
        }
    # Warm up: imports, connection pools, policy caches, script loading in both workers.
    wrk(gw_url, body_format=gw_body, headers=gw_headers, concurrency=4, duration=2)
    rounds = []
    for _ in range(args.rounds):
        rounds.append(
            run_round(
                args,
                master,
                floor_url,
                (gw_url, gw_body, gw_headers),
                (up_url, up_body, up_headers),
            )
        )
    # Each column's median over the rounds (errors: their sum), point by point.
    return [
        {
            name: (sum if name == "errors" else statistics.median)([r[i][name] for r in rounds])
            if name != "c"
            else point["c"]
            for name in point
        }
        for i, point in enumerate(rounds[0])
    ]


def serving(master: int, reference: bool) -> list[int]:
    """The processes that serve: gunicorn's workers, or the other gateway's process and
    all its descendants."""
    if not reference:
        return children(master)
    found, todo = [], [master]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children(pid)
    return found


def run_round(
    args: argparse.Namespace,
    master: int,
    floor_url: str | None,
    gw: tuple[str, str, dict[str, str]],
    up: tuple[str, str, dict[str, str]],
) -> list[dict[str, Any]]:
    (gw_url, gw_body, gw_headers), (up_url, up_body, up_headers) = gw, up
    results: list[dict[str, Any]] = []
    reference = bool(args.reference)
    if floor_url is not None:
        # The floor: the same stack (gunicorn, middleware, request log, metrics) answering
        # GET /health/live, which does no work of its own.
        workers = serving(master, reference)
        cpu_before = sum(proc_cpu(p) for p in workers)
        floor = wrk(
            floor_url,
            body_format="",
            headers={"X-Forwarded-Proto": "https"},
            concurrency=1,
            duration=args.duration,
            method="GET",
        )
        floor_cpu = sum(proc_cpu(p) for p in workers) - cpu_before
        results.append(
            {
                "c": "floor",
                "rps": floor["rps"],
                "p50": floor["p50_us"] / 1000,
                "p99": floor["p99_us"] / 1000,
                "cpu_ms": 1000 * floor_cpu / max(1, floor["requests"]),
                "rss": max(proc_hwm_mib(p) for p in workers),
                "errors": floor["non_2xx"],
            }
        )
    for c in args.concurrency:
        workers = serving(master, reference)
        cpu_before = sum(proc_cpu(p) for p in workers)
        through = wrk(
            gw_url, body_format=gw_body, headers=gw_headers, concurrency=c, duration=args.duration
        )
        cpu = sum(proc_cpu(p) for p in workers) - cpu_before
        straight = wrk(
            up_url, body_format=up_body, headers=up_headers, concurrency=c, duration=args.duration
        )
        results.append(
            {
                "c": c,
                "rps": through["rps"],
                "p50": through["p50_us"] / 1000,
                "p99": through["p99_us"] / 1000,
                "up_rps": straight["rps"],
                "up_p50": straight["p50_us"] / 1000,
                "up_p99": straight["p99_us"] / 1000,
                "overhead_p50": (through["p50_us"] - straight["p50_us"]) / 1000,
                "overhead_p99": (through["p99_us"] - straight["p50_us"]) / 1000,
                "cpu_ms": 1000 * cpu / max(1, through["requests"]),
                "rss": max(proc_hwm_mib(p) for p in workers),
                "errors": through["non_2xx"] + through["socket_errors"],
            }
        )
    return results


def render(
    results: list[dict[str, Any]],
    duration: float,
    worker_class: str,
    rounds: int = 1,
    workers: int = 2,
    *,
    reference: str = "",
) -> str:
    medians = f", the median of {rounds} rounds" if rounds > 1 else ""
    served = (
        f"the gateway at {reference} (CPU and RSS: its serving processes), every prompt unique"
        if reference
        else f"{workers} {worker_class} gunicorn worker{'s' if workers != 1 else ''}, every "
        "request a cache miss"
    )
    through = "that gateway" if reference else "Tollgate"
    lines = [
        f"wrk, {duration:g} s per point{medians}, {served}. Overhead: p50 and p99 through "
        f"{through} minus the upstream's p50.",
        "",
        "| concurrency | req/s | p50 | p99 | upstream alone p50 / p99 | overhead p50 / p99 "
        "| CPU / request | peak RSS / worker | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["c"] == "floor":
            lines.append(
                f"| GET /health/live (floor), 1 | {r['rps']:.0f} | {r['p50']:.2f} ms "
                f"| {r['p99']:.2f} ms | - | - | {r['cpu_ms']:.2f} ms | {r['rss']:.0f} MiB "
                f"| {r['errors']:.0f} |"
            )
            continue
        # Latency minus latency means something only while neither side queues: with more
        # connections than cores, both are mostly waiting for a CPU (read the CPU column).
        overhead = (
            f"{r['overhead_p50']:.2f} / {r['overhead_p99']:.2f} ms" if r["c"] == 1 else "queueing"
        )
        lines.append(
            f"| {r['c']} | {r['rps']:.0f} | {r['p50']:.2f} ms | {r['p99']:.2f} ms "
            f"| {r['up_p50']:.2f} / {r['up_p99']:.2f} ms | {overhead} "
            f"| {r['cpu_ms']:.2f} ms | {r['rss']:.0f} MiB | {r['errors']:.0f} |"
        )
    floor = next((r for r in results if r["c"] == "floor"), None)
    one = next((r for r in results if r["c"] == 1), None)
    if floor and one and floor["cpu_ms"] and floor["p50"]:
        # The same figures in units of this machine's own floor, which the machine changes
        # far less than the milliseconds.
        lines += [
            "",
            f"Against the floor of the same run: a miss at one connection costs "
            f"{one['cpu_ms'] / floor['cpu_ms']:.1f} times its CPU per request, and adds "
            f"{one['overhead_p50'] / floor['p50']:.1f} times its p50.",
        ]
    return "\n".join(lines)


def write_docs(table: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{START}\n{table}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)


def profile(count: int, key: str, env: dict[str, str]) -> None:
    """pyinstrument over `count` in-process cache-miss requests (Django test client)."""
    os.environ["OPENAI_BASE_URL"] = env["OPENAI_BASE_URL"]
    os.environ["OPENAI_API_KEY"] = env["OPENAI_API_KEY"]
    from django.conf import settings
    from django.test import Client
    from pyinstrument import Profiler

    settings.OPENAI_BASE_URL = env["OPENAI_BASE_URL"]
    settings.OPENAI_API_KEY = env["OPENAI_API_KEY"]
    settings.ALLOWED_HOSTS = ["*"]
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}")

    def one(i: int) -> None:
        body = {"prompt": f"profile {i} {time.time()}", "model": MODEL}
        response = client.post(
            "/api/v1/generate", body, content_type="application/json", secure=True
        )
        assert response.status_code == 200, response.content

    for i in range(30):
        one(i)
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        one(i)
    sys.stdout.write(
        f"unprofiled: {1000 * (time.perf_counter() - started) / count:.2f} ms wall, "
        f"{1000 * (time.process_time() - cpu) / count:.2f} ms CPU per request\n"
    )
    if os.environ.get("BENCH_CPROFILE"):
        import cProfile
        import pstats

        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for i in range(count):
            one(i)
        prof.disable()
        if os.environ.get("BENCH_CPROFILE_OUT"):
            prof.dump_stats(os.environ["BENCH_CPROFILE_OUT"])
        if os.environ.get("BENCH_CPROFILE_GROUP"):
            groups: dict[str, float] = {}
            for (filename, _, _), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
                group = filename
                for pattern in (
                    r"site-packages/([^/]+)",
                    r"/work/main/([^/]+)",
                    r"python3\.\d+/([^/]+)",
                ):
                    found = re.search(pattern, filename)
                    if found:
                        group = found.group(1)
                        break
                if filename == "~":
                    group = "builtins (sockets, C calls)"
                groups[group] = groups.get(group, 0.0) + tottime
            total = sum(groups.values())
            for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1])[:25]:
                sys.stdout.write(f"{group:30s} {100 * seconds / total:5.1f}%\n")
            return
        order = os.environ.get("BENCH_CPROFILE_SORT", "tottime")
        lines = int(os.environ.get("BENCH_CPROFILE_LINES", "45"))
        pstats.Stats(prof, stream=sys.stdout).sort_stats(order).print_stats(lines)
        return
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for i in range(count):
        one(i)
    profiler.stop()
    sys.stdout.write(profiler.output_text(unicode=False, color=False, show_all=False))


def breakdown(count: int, key: str, env: dict[str, str]) -> None:
    """CPU time of each step of a cache-miss request, in-process, `count` times each."""
    import uuid

    from django.conf import settings
    from django.test import Client

    from generation import serializers as gen_serializers
    from generation import services as generation
    from generation.providers import provider_get
    from generation.providers.base import CompletionRequest
    from generation.resilience import Breaker, upstream_complete
    from quotas import services as quotas
    from quotas.models import ApiKey

    settings.OPENAI_BASE_URL = env["OPENAI_BASE_URL"]
    settings.OPENAI_API_KEY = env["OPENAI_API_KEY"]
    settings.ALLOWED_HOSTS = ["*"]
    api_key = ApiKey.objects.filter(name="bench").latest("created_at")
    user_id, key_id = api_key.user_id, api_key.pk
    request = CompletionRequest(
        model="gpt-bench",
        messages=({"role": "user", "content": "explain caching"},),
        max_tokens=256,
    )
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}")
    provider = provider_get("openai")
    breaker = Breaker("openai", "gpt-bench")

    answer = {
        "text": "x" * 200,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 10, "completion_tokens": 20},
    }

    def admit_settle() -> None:
        # The request path itself, with a constant in place of the upstream call.
        generation.generation_run(
            caller=generation.Caller(user_id=user_id, key_id=key_id, request_id=uuid.uuid4().hex),
            model=MODEL,
            messages=[{"role": "user", "content": f"breakdown {uuid.uuid4().hex}"}],
            max_tokens=None,
            temperature=None,
            cache_policy="use",
            compute=lambda request, provider: answer,
        )

    def full() -> None:
        body = {"prompt": f"breakdown {uuid.uuid4().hex}", "model": MODEL}
        r = client.post("/api/v1/generate", body, content_type="application/json", secure=True)
        assert r.status_code == 200, r.content

    steps = {
        "whole request (Django test client, in-process)": full,
        "request body validation (serializer)": lambda: gen_serializers.GenerateInputSerializer(
            data={"prompt": "explain caching", "model": MODEL}
        ).is_valid(raise_exception=True),
        "policy_get (in-process cache)": lambda: quotas.policy_get(
            user_id=user_id, key_id=key_id, model=MODEL
        ),
        "the request path without the upstream call: admission with the cache look-up and "
        "lock, settlement with the store and release, ledger INSERT": admit_settle,
        "circuit breaker check": breaker.allow,
        "provider call (openai, fake upstream)": lambda: provider.complete(request, timeout=5),
        "upstream_complete (retry wrapper + breaker + provider call)": lambda: upstream_complete(
            provider="openai", request=request
        ),
    }
    sys.stdout.write("| step | CPU | wall |\n|---|---|---|\n")
    for name, step in steps.items():
        for _ in range(20):
            step()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(count):
            step()
        cpu_ms = 1000 * (time.process_time() - cpu) / count
        wall_ms = 1000 * (time.perf_counter() - wall) / count
        sys.stdout.write(f"| {name} | {cpu_ms:.3f} ms | {wall_ms:.3f} ms |\n")
    redis_trips, sql = min(round_trips(full) for _ in range(20))
    sys.stdout.write(
        f"\nA whole miss (the fewest of 20): {redis_trips} Redis round trip(s), "
        f"{sql} SQL statement(s).\n"
    )


SCENARIOS = {
    "floor": "GET /health/live (the floor)",
    "refused": "POST /api/v1/generate refused: 400, no prompt",
    "hit": "POST /api/v1/generate, a cache hit",
    "miss": "POST /api/v1/generate, a cache miss (openai provider, fake upstream)",
}


def instructions(count: int, key: str, env: dict[str, str], only: list[str] | None = None) -> str:
    """Instructions per request of each scenario (or of those in `only`), from two
    cachegrind runs of `loop`."""
    small = max(1, count // 5)
    lines = [
        f"Instructions per request (valgrind cachegrind: a run of {count} requests minus a run "
        f"of {small}, over the {count - small} extra requests), the WSGI application called "
        "in-process as a gunicorn worker calls it.",
        "",
        "| request | instructions | against the floor |",
        "|---|---|---|",
    ]
    floor = 0.0
    for scenario, label in SCENARIOS.items():
        if only and scenario not in only:
            continue
        totals = []
        for n in (small, count):
            run = subprocess.run(
                [
                    "valgrind",
                    "--tool=cachegrind",
                    "--cache-sim=no",
                    "--cachegrind-out-file=/dev/null",
                    sys.executable,
                    __file__,
                    "--loop",
                    scenario,
                    "--count",
                    str(n),
                ],
                # A fixed hash seed: the same dict and set layouts in both runs. The
                # repository's root as the working directory, as gunicorn runs it: an older
                # checkout's miss counted from another checkout's directory came out 1.6 M
                # lower than from its own root (the cause was not found).
                cwd=ROOT,
                env={**env, "BENCH_KEY": key, "PYTHONHASHSEED": "0"},
                capture_output=True,
                text=True,
                check=False,
            )
            found = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
            if run.returncode or not found:
                sys.exit(f"{scenario} under valgrind failed:\n{run.stderr[-3000:]}")
            totals.append(int(found.group(1).replace(",", "")))
        per_request = (totals[1] - totals[0]) / (count - small)
        floor = floor or per_request
        lines.append(f"| {label} | {per_request / 1e6:.2f} M | {per_request / floor:.1f} x |")
    return "\n".join(lines)


def simulated_clock(step: float) -> Any:
    """Replace `time.time`, `time.monotonic` and `time.perf_counter` with clocks that move
    `step` seconds at each call of the returned `tick` and a microsecond at each reading
    (so that a loop waiting for time to pass still ends). Code that imported the functions
    themselves before the call keeps the real ones. The clock starts at the real time."""
    elapsed = 0.0
    real = {name: getattr(time, name)() for name in ("time", "monotonic", "perf_counter")}

    def reader(start: float) -> Any:
        def read() -> float:
            nonlocal elapsed
            elapsed += 1e-6
            return start + elapsed

        return read

    for name, start in real.items():
        setattr(time, name, reader(start))

    def tick() -> None:
        nonlocal elapsed
        elapsed += step

    return tick


def loop(scenario: str, count: int) -> None:
    """`count` requests of one scenario through the WSGI application, on a simulated clock
    of 3 ms per request; nothing printed."""
    import io

    # Before the application's imports, so that a module holding `time.monotonic` itself
    # (a dataclass's default factory, a `from time import`) holds the simulated one: a
    # latency measured across the two clocks came out negative.
    tick = simulated_clock(0.003)
    from config.gunicorn_hooks import post_worker_init
    from config.wsgi import application

    post_worker_init(None)  # as in a gunicorn worker: views and SDKs loaded, the heap frozen
    key, run = os.environ["BENCH_KEY"], os.urandom(6).hex()

    def call(method: str, path: str, body: dict[str, Any] | None, expect: int) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_AUTHORIZATION": f"Bearer {key}",
            "HTTP_X_FORWARDED_PROTO": "https",  # as behind deploy/nginx
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(data)),
            "wsgi.input": io.BytesIO(data),
            "wsgi.errors": sys.stderr,
            "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0),
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        status: list[str] = []
        response = application(environ, lambda s, headers, exc_info=None: status.append(s))
        try:
            b"".join(response)
        finally:
            response.close()  # type: ignore[attr-defined]
        if not status[0].startswith(str(expect)):
            sys.exit(f"{scenario}: {status[0]}, expected {expect}")

    requests = {
        "floor": lambda i: call("GET", "/health/live", None, 200),
        "refused": lambda i: call("POST", "/api/v1/generate", {"model": MODEL}, 400),
        "hit": lambda i: call(
            "POST", "/api/v1/generate", {"prompt": f"hit {run}", "model": MODEL}, 200
        ),
        "miss": lambda i: call(
            "POST", "/api/v1/generate", {"prompt": f"miss {run} {i}", "model": MODEL}, 200
        ),
    }
    one = requests[scenario]
    for i in range(20):  # warm: connections, scripts, policy and key caches
        tick()
        one(-1 - i)
    for i in range(count):
        tick()
        one(i)


def round_trips(step: Any) -> tuple[int, int]:
    """(Redis round trips, SQL statements) of one call of `step`; a pipeline or a script
    is one round trip."""
    import redis.connection
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    sent = 0
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += 1
        return original(self, *args, **kwargs)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        with CaptureQueriesContext(connection) as queries:
            step()
    finally:
        redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
    return sent, len(queries)


if __name__ == "__main__":
    main()

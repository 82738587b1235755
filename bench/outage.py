"""Outage drills: Redis or PostgreSQL goes away under load, and comes back.

    .venv/bin/python bench/outage.py --kind redis-stop [--fail-mode open|closed]
                                     [--before 5] [--outage 7] [--after 10] [--threads 8]
                                     [--workers 2] [--worker-class gthread] [--log FILE]

Kinds: `redis-stop` (the server shut down, then started again empty, as a Redis without
persistence), `redis-freeze` (SIGSTOP, then SIGCONT: a hung Redis, every call running into
its socket timeout), `postgres-stop` (`pg_ctl stop -m fast`, then `pg_ctl start`),
`postgres-freeze` (every process of the cluster stopped with SIGSTOP, then SIGCONT: a
database behind a dead link).

Nothing shared is touched: the drill starts its own redis-server on a free port
(config/tests/redis_server.py) and, for `postgres-stop`, its own PostgreSQL 15 cluster
(initdb in a temporary directory, run as the `postgres` user when started as root, its own
port and socket directory, trust authentication). The Redis drills keep the ledger in the
shared PostgreSQL, database `tollgate_bench_outage` (DATABASE_URL overrides it). The ledger
spool (LEDGER_SPOOL_DIR) is a temporary directory of the drill's own.

Tollgate runs under gunicorn (the repository's gunicorn.conf.py, LOG_LEVEL=WARNING, its
stderr kept in a log file) with the offline `local` provider and a key whose plan, key and
global limits are all set, far above what the drill sends. --threads client threads send
`POST /api/v1/generate` with unique prompts (cache misses) over keep-alive connections, for
--before seconds, through the outage (--outage seconds) and --after seconds past its end.

Reported per phase: requests, requests/s, statuses by error code, latency p50/p99/max, how
many took over a second, and the 200s of each second. Then, once the spool is empty and no
ledger row is pending (polled for up to 30 s), the reconciliation: every 200 has exactly
one ledger row under its X-Request-ID, with outcome `ok`; no row belongs to a request that
got no 200; no refused request is charged; the day's request counter in Redis (GET
/api/v1/quota) equals the ledger's count of counted rows. Last, the log lines by event: how
many, how many carry a traceback. The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import BIG, LOCAL_MODEL, ensure_database, unlimited_principal  # noqa: E402
from config.tests.redis_server import PrivateRedis, free_port  # noqa: E402

MODEL = "local/demo"
USERNAME = "bench-outage"
DB_NAME = "tollgate_bench_outage"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A PostgreSQL cluster of the drill's own: a temporary data directory, a free port, the
    socket in the same directory, trust authentication. initdb refuses root, so the server
    runs as `postgres` when the drill runs as root."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{DB_NAME}"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(PG_BIN / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        log = str(self.dir / "server.log")
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", log, "-o", options)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data))

    def _processes(self) -> list[int]:
        """The postmaster and every process it started (backends, checkpointer...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def pause(self) -> None:
        """Every process of the cluster stopped (SIGSTOP): connections are accepted by the
        kernel and nothing answers, as behind a dead link or a frozen host."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def setup_database() -> tuple[str, int]:
    """Migrate the drill's database; the `local` model, a plan with every limit set (far
    above what the drill sends), the drill's user on it with no ledger rows left from an
    earlier run, and a fresh key with its own limits. Returns the key and the user's id."""
    ensure_database(os.environ["DATABASE_URL"])
    import django

    django.setup()
    from quotas import services
    from quotas.models import ApiKey, UsageRecord

    user = unlimited_principal(
        username=USERNAME, plan=USERNAME, model=MODEL, model_fields=LOCAL_MODEL
    )
    UsageRecord.objects.filter(user=user).delete()
    ApiKey.objects.filter(user=user).delete()
    full_key, _ = services.key_create(
        user=user, name="outage", requests_per_minute=BIG, tokens_per_minute=BIG * 1000
    )
    return full_key, int(user.pk)


class Sample(NamedTuple):
    at: float  # seconds since the drill's start, when the request was sent
    status: int  # 0: no HTTP answer (connection refused, reset, timed out)
    code: str  # the error code of a non-200, or the exception's name
    request_id: str
    latency: float  # seconds


def client(  # noqa: PLR0917 - a thread's target
    tid: int, port: int, key: str, t0: float, until: float, tag: str, out: list[Sample]
) -> None:
    """Send misses one after the other on a keep-alive connection until `until`."""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "X-Forwarded-Proto": "https",
        "Host": "127.0.0.1",
    }
    conn: http.client.HTTPConnection | None = None
    n = 0
    while time.monotonic() < until:
        n += 1
        body = json.dumps(
            {"prompt": f"outage {tag} {tid}-{n}: explain caching", "model": MODEL, "max_tokens": 40}
        )
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/api/v1/generate", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            status, rid, code = resp.status, resp.getheader("X-Request-ID") or "", ""
            if status != 200:
                try:
                    code = json.loads(data)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "(no error body)"
            if (resp.getheader("Connection") or "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            status, rid, code = 0, "", type(exc).__name__
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.05)  # a refused connection comes back at once
        end = time.monotonic()
        out.append(Sample(start - t0, status, code, rid, end - start))
    if conn is not None:
        conn.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def phase_report(name: str, samples: list[Sample], span: float, first: float) -> list[str]:
    statuses = collections.Counter(f"{s.status} {s.code}".strip() for s in samples)
    lat = [s.latency * 1000 for s in samples]
    per_second = collections.Counter(int(s.at - first) for s in samples if s.status == 200)
    seconds = max(1, round(span))
    line = " ".join(str(per_second.get(i, 0)) for i in range(seconds))
    rate = len(samples) / max(span, 1e-9)
    return [
        f"{name}: {len(samples)} requests in {span:.1f} s, {rate:.0f}/s; p50 {pct(lat, 0.5):.1f}"
        f" ms, p99 {pct(lat, 0.99):.1f} ms, max {max(lat, default=0):.1f} ms,"
        f" over 1 s {sum(ms > 1000 for ms in lat)}",
        "  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
        f"  200s per second: {line}",
    ]


def outage_start(kind: str, redis: PrivateRedis, pg: PrivatePostgres | None) -> None:
    if kind == "redis-stop":
        redis.stop()
    elif kind == "redis-freeze":
        redis.pause()
    elif kind == "postgres-freeze":
        assert pg is not None  # noqa: S101
        pg.pause()
    else:
        assert pg is not None  # noqa: S101
        pg.stop("fast")


def outage_end(kind: str, redis: PrivateRedis, pg: PrivatePostgres | None) -> None:
    if kind == "redis-stop":
        redis.start()  # empty: no persistence
    elif kind == "redis-freeze":
        redis.resume()
    elif kind == "postgres-freeze":
        assert pg is not None  # noqa: S101
        pg.resume()
    else:
        assert pg is not None  # noqa: S101
        pg.start()


def ledger_rows(user_id: int) -> dict[str, list[tuple[str, Any]]]:
    from django.db import connections

    from quotas.models import UsageRecord

    connections.close_all()  # the server may have restarted since the last query
    rows: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
    for rid, outcome, cost in UsageRecord.objects.filter(user_id=user_id).values_list(
        "request_id", "outcome", "cost_usd"
    ):
        rows[rid].append((outcome, cost))
    return rows


def spool_files(spool: Path) -> int:
    return sum(1 for _ in spool.rglob("*.jsonl"))


def drain(user_id: int, ok_ids: set[str], spool: Path, timeout: float = 30.0) -> float:
    """Wait until the spool is empty, no row is pending and every 200 has its row (or
    `timeout`); the seconds waited."""
    from quotas.models import Outcome

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            rows = ledger_rows(user_id)
        except Exception:  # noqa: BLE001 - the database still coming up
            rows = None
        if (
            rows is not None
            and not spool_files(spool)
            and not any(o == Outcome.PENDING for r in rows.values() for o, _ in r)
            and ok_ids <= rows.keys()
        ):
            break
        time.sleep(0.5)
    return time.monotonic() - start


def quota_used(port: int, key: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "GET",
        "/api/v1/quota",
        headers={
            "Authorization": f"Bearer {key}",
            "X-Forwarded-Proto": "https",
            "Host": "127.0.0.1",
        },
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        return None
    return int(json.loads(data)["limits"]["requests_per_day"]["used"])


def ledger_counted_today(user_id: int) -> int:
    from quotas.engine import calendar_bounds
    from quotas.models import UsageRecord
    from quotas.services.ledger import COUNTED_OUTCOMES

    day_start = calendar_bounds(time.time())[0]
    return UsageRecord.objects.filter(
        user_id=user_id, created_at__gte=day_start, outcome__in=COUNTED_OUTCOMES, fallback=False
    ).count()


def reconcile(samples: list[Sample], user_id: int, port: int, key: str) -> tuple[list[str], bool]:
    from quotas.models import Outcome
    from quotas.services.ledger import COUNTED_OUTCOMES

    rows = ledger_rows(user_id)
    ok = [s.request_id for s in samples if s.status == 200]
    refused = {s.request_id for s in samples if s.status != 200 and s.request_id}
    answered = set(ok) | refused
    repeated = [rid for rid, n in collections.Counter(ok).items() if n > 1]
    missing = [rid for rid in ok if rid not in rows]
    doubled = [rid for rid in ok if len(rows.get(rid, ())) > 1]
    not_ok = [rid for rid in ok if rid in rows and rows[rid][0][0] != Outcome.OK]
    orphans = [rid for rid in rows if rid not in answered]
    charged = [
        rid
        for rid in refused
        if any(o in COUNTED_OUTCOMES or cost for o, cost in rows.get(rid, ()))
    ]
    refused_rows = collections.Counter(rows[rid][0][0] for rid in refused if rid in rows)
    # The day counter as Redis holds it once the workers are back on it.
    used, counted = None, ledger_counted_today(user_id)
    for _ in range(20):
        used = quota_used(port, key)
        if used == counted:
            break
        time.sleep(0.5)
    checks = {
        "200s with exactly one ledger row": not missing and not doubled,
        "their rows' outcome is ok": not not_ok,
        "no ledger row without an answered request": not orphans,
        "no refused request charged": not charged,
        "no request id answered twice": not repeated,
        "Redis day counter = ledger's counted rows": used == counted,
    }
    lines = [
        f"ledger: {sum(len(r) for r in rows.values())} rows; 200s: {len(ok)}, "
        f"missing {len(missing)}, doubled {len(doubled)}, outcome not ok {len(not_ok)}; "
        f"rows of no answered request {len(orphans)}; refused requests {len(refused)}, "
        f"their rows {dict(refused_rows)}, charged {len(charged)}",
        f"Redis requests_per_day used {used}, ledger counted rows today {counted}",
    ]
    for rid in (missing + doubled + not_ok + orphans + charged)[:10]:
        lines.append(f"  e.g. {rid}: {rows.get(rid)}")
    lines += [f"  [{'ok' if good else 'FAIL'}] {name}" for name, good in checks.items()]
    return lines, all(checks.values())


def log_report(path: Path, requests: int) -> list[str]:
    """The log's lines by level and event (numbers and ids masked), and the tracebacks."""
    events: collections.Counter[str] = collections.Counter()
    tracebacks: collections.Counter[str] = collections.Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        total += 1
        try:
            line = json.loads(raw)
            event = f"{line.get('level', '?')} {line.get('event', '')}"
        except ValueError:
            line, event = {}, f"(not JSON) {raw}"
        event = re.sub(r"[0-9a-f]{8,}|\d+", "#", event.split("\n", 1)[0])[:110]
        events[event] += 1
        if line.get("exception"):
            tracebacks[event] += 1
    lines = [f"log: {total} lines for {requests} requests"]
    lines += [f"  {n:6d}  {event}" for event, n in events.most_common(15)]
    lines += [f"  tracebacks: {n} x {event}" for event, n in tracebacks.most_common()]
    return lines


def main() -> int:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--kind", choices=("redis-stop", "redis-freeze", "postgres-stop", "postgres-freeze")
    )
    parser.add_argument("--fail-mode", choices=("open", "closed"), default="open")
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--outage", type=float, default=7.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-class", default="gthread")
    parser.add_argument("--log", help="keep gunicorn's log here (default: a temporary file)")
    args = parser.parse_args()
    if not args.kind:
        parser.error("--kind is required")

    tmp = Path(tempfile.mkdtemp(prefix="tollgate-outage-"))
    redis = PrivateRedis()
    pg: PrivatePostgres | None = None
    gunicorn: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        if args.kind.startswith("postgres-"):
            pg = PrivatePostgres()
            pg.start()
            os.environ["DATABASE_URL"] = pg.url
        else:
            os.environ.setdefault("DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/{DB_NAME}")
        spool = tmp / "spool"
        log_path = Path(args.log) if args.log else tmp / "gunicorn.log"
        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "REDIS_URL": redis.url,
                "CELERY_BROKER_URL": redis.url,
                "SECRET_KEY": "bench-only",
                "DEBUG": "0",
                "ALLOWED_HOSTS": "127.0.0.1",
                "LOG_LEVEL": "WARNING",
                "QUOTA_FAIL_MODE": args.fail_mode,
                "LEDGER_SPOOL_DIR": str(spool),
            }
        )
        key, user_id = setup_database()
        port = free_port()
        env = {
            **os.environ,
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": str(args.workers),
            "GUNICORN_WORKER_CLASS": args.worker_class,
            "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom"),
            "PYTHONPATH": str(ROOT),
        }
        (tmp / "prom").mkdir()
        with log_path.open("wb") as log:
            gunicorn = subprocess.Popen(
                # gunicorn.conf.py is read from the working directory.
                [str(Path(sys.executable).with_name("gunicorn")), "config.wsgi"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        from bench.generate import wait_http

        wait_http(f"http://127.0.0.1:{port}/health/live")

        samples: list[Sample] = []
        tag = f"{args.kind}-{args.fail_mode}-{int(time.time())}"
        t0 = time.monotonic()
        total = args.before + args.outage + args.after
        threads = [
            threading.Thread(
                target=client, args=(i, port, key, t0, t0 + total, tag, samples), daemon=True
            )
            for i in range(args.threads)
        ]
        for t in threads:
            t.start()
        time.sleep(args.before)
        down = time.monotonic() - t0
        outage_start(args.kind, redis, pg)
        down_took = time.monotonic() - t0 - down
        time.sleep(max(0.0, t0 + args.before + args.outage - time.monotonic()))
        restart = time.monotonic() - t0
        outage_end(args.kind, redis, pg)
        up = time.monotonic() - t0  # the server is back: requests sent from now are "after"
        up_took = up - restart
        for t in threads:
            t.join(60)
        end = time.monotonic() - t0

        ok_ids = {s.request_id for s in samples if s.status == 200}
        waited = drain(user_id, ok_ids, spool)
        out = [
            f"drill {args.kind}, QUOTA_FAIL_MODE={args.fail_mode}, {args.threads} client threads,"
            f" {args.workers} {args.worker_class} workers",
            f"outage from {down:.1f} s (the stop took {down_took:.2f} s) to {up:.1f} s (the "
            f"restart took {up_took:.2f} s); the run ended at {end:.1f} s",
        ]
        phases = (
            ("before", [s for s in samples if s.at < down], 0.0, down),
            ("outage", [s for s in samples if down <= s.at < up], down, up - down),
            ("after", [s for s in samples if s.at >= up], up, end - up),
        )
        for name, part, first, span in phases:
            out += phase_report(name, part, span, first)
        out.append(f"drained in {waited:.1f} s (spool files left: {spool_files(spool)})")
        lines, good = reconcile(samples, user_id, port, key)
        out += lines
        out += log_report(log_path, len(samples))
        if args.log is None:
            out.append(f"gunicorn log: {log_path}")
        sys.stdout.write("\n".join(out) + "\n")
        return 0 if good else 1
    finally:
        if gunicorn is not None:
            gunicorn.send_signal(signal.SIGTERM)
            gunicorn.wait(60)
        redis.stop()
        if pg is not None:
            from django.db import connections

            connections.close_all()
            pg.remove()


if __name__ == "__main__":
    sys.exit(main())

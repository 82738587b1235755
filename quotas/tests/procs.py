"""A worker process for the multi-process tests: the same Django project, the same test
database and Redis, driven by JSON commands on stdin (one per line, one reply per line).

    {"op": "admit", "user_id": 1, "key_id": null, "threads": 16, "per_thread": 3,
     "prompt_tokens": 10, "max_tokens": 10, "settle_tokens": [5, 5]}
    -> {"admitted": 7, "denied": 41, "errors": {"quota_exceeded": 41}, "hits": 0}

With "gate": "<redis key>", each admission looks that cache entry up in its own script
(quotas' CacheGate); "hits" counts the admissions that found it fresh.

    {"op": "flush"} -> {"written": 3}   (usage_flush(); {"error": "<class>"} if it fails)

    {"op": "standing", "user_id": 1, "key_id": null} -> GET /api/v1/quota's body
    (quota_standing(); {"error": "<code>"} for an ApiError)

    {"op": "churn", "user_id": 1, "threads": 8, "per_thread": 40, "prompt_tokens": 10,
     "max_tokens": 40, "seed": 7}
    -> {"admitted": 90, "denied": 230, "errors": {"quota_exceeded": 230}, "refunded": 9,
        "settled_tokens": 3012}
    Each admitted request is held in flight 0-15 ms, then refunded (one in ten) or settled
    with the prompt and a random completion of at most max_tokens.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def _threads(count: int, work: Callable[[int], None]) -> None:
    """Run `work(i)` on `count` threads at once; re-raise the first failure."""
    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(work, i) for i in range(count)]:
            future.result()


def _reply(outcomes: Counter[str], *tallies: str) -> dict[str, Any]:
    """The reply of an admitting command: admissions, refusals by error code, and the
    command's own `tallies`."""
    reply: dict[str, Any] = {"admitted": outcomes.pop("admitted", 0)}
    reply.update({name: outcomes.pop(name, 0) for name in tallies})
    return {**reply, "denied": sum(outcomes.values()), "errors": dict(outcomes)}


def _admit_many(cmd: dict[str, Any]) -> dict[str, Any]:
    from django.db import close_old_connections

    from config.errors import ApiError
    from quotas import services

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(cmd.get("threads", 1))

    def one_thread() -> None:
        barrier.wait()
        try:
            for _ in range(cmd.get("per_thread", 1)):
                gate = None
                if cmd.get("gate"):
                    token = uuid.uuid4().hex
                    gate = services.CacheGate(
                        entry=cmd["gate"], lock=f"{cmd['gate']}:lock", token=token, lock_ms=1000
                    )
                try:
                    admission = services.admission_admit(
                        user_id=cmd["user_id"],
                        key_id=cmd.get("key_id"),
                        model=cmd.get("model", "local/demo"),
                        request_id=uuid.uuid4().hex,
                        prompt_tokens=cmd.get("prompt_tokens", 1),
                        max_tokens=cmd.get("max_tokens", 1),
                        priority=cmd.get("priority", "high"),
                        gate=gate,
                    )
                except ApiError as exc:
                    with lock:
                        outcomes[exc.code] += 1
                    continue
                if admission.cached:
                    with lock:
                        outcomes["hits"] += 1
                        outcomes["admitted"] += 1
                    continue
                settle = cmd.get("settle_tokens")
                if settle is not None:
                    services.usage_settle(
                        admission=admission,
                        prompt_tokens=settle[0],
                        completion_tokens=settle[1],
                        latency_ms=1,
                    )
                with lock:
                    outcomes["admitted"] += 1
        finally:
            close_old_connections()

    _threads(cmd.get("threads", 1), lambda i: one_thread())
    return _reply(outcomes, "hits")


def _churn(cmd: dict[str, Any]) -> dict[str, Any]:
    import random
    import time

    from django.db import close_old_connections

    from config.errors import ApiError
    from quotas import services

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(cmd["threads"])

    def one_thread(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(cmd["per_thread"]):
                try:
                    admission = services.admission_admit(
                        user_id=cmd["user_id"],
                        key_id=None,
                        model=cmd.get("model", "local/demo"),
                        request_id=uuid.uuid4().hex,
                        prompt_tokens=cmd["prompt_tokens"],
                        max_tokens=cmd["max_tokens"],
                        priority="high",
                    )
                except ApiError as exc:
                    with lock:
                        outcomes[exc.code] += 1
                    continue
                time.sleep(rng.random() * 0.015)
                if rng.random() < 0.1:
                    services.usage_refund(admission=admission, outcome="upstream_error")
                    with lock:
                        outcomes["refunded"] += 1
                    continue
                completion = rng.randint(0, cmd["max_tokens"])
                services.usage_settle(
                    admission=admission,
                    prompt_tokens=cmd["prompt_tokens"],
                    completion_tokens=completion,
                    latency_ms=1,
                )
                with lock:
                    outcomes["admitted"] += 1
                    outcomes["settled_tokens"] += cmd["prompt_tokens"] + completion
        finally:
            close_old_connections()

    _threads(cmd["threads"], lambda i: one_thread(cmd.get("seed", 0) * 1000 + i))
    return _reply(outcomes, "refunded", "settled_tokens")


def _flush() -> dict[str, Any]:
    from django.db import DatabaseError

    from quotas.services import usage_flush

    try:
        return {"written": usage_flush()}
    except DatabaseError as exc:
        return {"error": type(exc).__name__}


def _standing(cmd: dict[str, Any]) -> dict[str, Any]:
    from config.errors import ApiError
    from quotas.services import quota_standing

    try:
        return quota_standing(user_id=cmd["user_id"], key_id=cmd.get("key_id"))
    except ApiError as exc:
        return {"error": exc.code}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    print(json.dumps({"ready": True}), flush=True)  # noqa: T201
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "admit":
            reply = _admit_many(cmd)
        elif cmd["op"] == "churn":
            reply = _churn(cmd)
        elif cmd["op"] == "flush":
            reply = _flush()
        elif cmd["op"] == "standing":
            reply = _standing(cmd)
        elif cmd["op"] == "exit":
            break
        else:
            reply = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(reply), flush=True)  # noqa: T201


if __name__ == "__main__":
    main()

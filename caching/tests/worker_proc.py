"""A second Tollgate process for the cross-process cache tests.

`python -m caching.tests.worker_proc read KEY...`: reads each key (promoting it into this
process's memory layer), prints the layers, then on every `check` line on stdin reads them
again and prints the layers ("none" for a miss).
`python -m caching.tests.worker_proc flight KEY THREADS`: once the Redis key `test:go`
exists, THREADS threads call single_flight(KEY); prints how many computed here and the
layers the others took the answer from.
`python -m caching.tests.worker_proc invalidate PATTERN`: an operator's purge made in this
process (`cache_invalidate`); prints how many entries it dropped.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from caching.services import cache_get, cache_invalidate, single_flight  # noqa: E402
from caching.tier import tier  # noqa: E402


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _layers(keys: list[str]) -> list[str]:
    layers = []
    for key in keys:
        hit = cache_get(key)
        layers.append("none" if hit is None else hit.layer)
    return layers


def read(keys: list[str]) -> None:
    _layers(keys)
    _say(json.dumps(_layers(keys)))
    for line in sys.stdin:
        if line.strip() == "check":
            _say(json.dumps(_layers(keys)))


def flight(key: str, threads: int) -> None:
    redis = tier().redis

    def compute() -> dict:
        redis.incr("test:computes")
        time.sleep(0.3)
        return {"text": "shared answer"}

    results: list[str | None] = []

    def worker() -> None:
        value, layer = single_flight(key, compute, wait_seconds=10)
        assert value == {"text": "shared answer"}  # noqa: S101
        results.append(layer)

    _say("ready")
    while not redis.exists("test:go"):
        time.sleep(0.005)
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    computed = results.count(None)
    layers = sorted({layer for layer in results if layer is not None})
    _say(json.dumps({"done": len(results), "computed_here": computed, "layers": layers}))


if __name__ == "__main__":
    if sys.argv[1] == "read":
        read(sys.argv[2:])
    elif sys.argv[1] == "invalidate":
        _say(json.dumps(cache_invalidate(pattern=sys.argv[2])))
    else:
        flight(sys.argv[2], int(sys.argv[3]))

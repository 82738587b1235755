from __future__ import annotations

import threading

from caching.memory import MemoryLayer


def test_memory_layer_keeps_size_bound_under_concurrent_writers():
    layer = MemoryLayer(max_size=50)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(2000):
                key = f"gen:{n}:{i % 120}"
                layer.put(key, "v", expires_at=1e12)
                layer.get(f"gen:{(n + 1) % 8}:{i % 120}")
                if i % 97 == 0:
                    layer.delete_matching(lambda key, n=n: key.startswith(f"gen:{n}:1"))
        except BaseException as exc:  # noqa: BLE001 - any failure in a thread fails the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(layer) == 50


def test_memory_layer_expired_entry_is_dropped_on_read():
    layer = MemoryLayer(max_size=10)
    layer.put("gen:a", "v", expires_at=100.0)

    assert layer.get("gen:a", now=99.0) == "v"
    assert layer.get("gen:a", now=100.0) is None
    assert len(layer) == 0


def test_memory_layer_size_zero_stores_nothing():
    layer = MemoryLayer(max_size=0)
    layer.put("gen:a", "v", expires_at=1e12)

    assert layer.get("gen:a") is None

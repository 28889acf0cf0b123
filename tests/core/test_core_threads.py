"""Concurrency: threads allocating on their own tags while another thread sleeps and wakes."""

from __future__ import annotations

import threading

from helpers import MiB, pattern


def test_eight_allocating_threads_while_another_sleeps_and_wakes(alloc, fake):
    workers = 8
    rounds = 12
    for i in range(workers):
        alloc.set_policy(f"worker-{i}", "keep")  # the sleeper sleeps the other tags
    size = 1 * MiB + 123
    weights = alloc.allocate(size, tag="weights")
    fake.write(weights, pattern(size, 1))
    alloc.allocate(2 * MiB, tag="kv_cache")
    errors: list[BaseException] = []
    start = threading.Barrier(workers + 1)

    def worker(i: int) -> None:
        try:
            start.wait(10)
            for r in range(rounds):
                with alloc.tag(f"worker-{i}"):
                    n = (i + 1) * 4096 + r
                    address = alloc.allocate(n)
                data = pattern(n, 1000 * i + r)
                fake.write(address, data)
                assert fake.read(address, n) == data
                alloc.free(address)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    start.wait(10)
    for _cycle in range(6):
        alloc.sleep(level=1)
        assert "worker-0" not in alloc.sleeping_tags
        alloc.wake_up()
        assert fake.read(weights, size) == pattern(size, 1)
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(alloc.stats().tags[f"worker-{i}"].allocations == 0 for i in range(workers))

"""Threads racing allocate/free/write/sleep/wake_up/empty_cache, then close, with deadlock detection.

Phase 1: worker threads allocate, write, read back and free in the resident tag "default" (policy keep:
no sleep may touch its bytes), churn the sleepable tag "kv_cache" (refused with SleepStateError while it
sleeps, never any other error), while one thread sleeps (level 1 or 2) and wakes (all or some tags) and
empties the cache. The weights written before the race must read back exactly after the final wake.
Phase 2: the same workers run while the main thread closes the allocator: each must stop on a
SleepStateError saying the allocator was closed, and close() must leave no GPU memory and no driver object.

Every join has a timeout; a thread still alive after it is a suspected deadlock: all stacks are dumped
(faulthandler) and the test fails. pytest-timeout is the backstop. Each thread does a bounded number of
operations, so the test takes seconds; $GPUSLEEP_CAMPAIGN_SCALE multiplies them.
"""

from __future__ import annotations

import faulthandler
import random
import sys
import threading
import traceback
from dataclasses import dataclass, field

import pytest
from campaign_model import CampaignFigures, MiB, campaign_scale, leak_report, pattern

import gpusleep

OPERATIONS_PER_THREAD = 100  # times $GPUSLEEP_CAMPAIGN_SCALE
JOIN_TIMEOUT_SECONDS = 120.0  # far beyond what the bounded work needs: only a deadlock gets there
LEGACY_STREAM = 0


@dataclass
class Race:
    """What the threads share: the allocator, the driver double, and what went wrong."""

    fake: object
    allocator: gpusleep.Allocator
    global_mode: bool
    closing: threading.Event = field(default_factory=threading.Event)
    errors: list = field(default_factory=list)
    figures: CampaignFigures = field(default_factory=lambda: CampaignFigures("threads"))
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: threading.Event = field(default_factory=threading.Event)  #: set once `busy_after` operations ran
    busy_after: int = 0
    level2_sleeps: int = 0  #: a level-2 sleep discards the weights: they wake zero-filled
    #: Whether the resident workers write and read their blocks. Not while close() races them: a write the test
    #: makes through the double between close()'s device wait and its unmap is the test's own use after free
    #: (the double rightly reports the unmap under the queued copy), not gpusleep's.
    touch_memory: bool = True

    def record(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def count(self, *, cases: int = 0, bytes_checked: int = 0) -> None:
        with self.lock:
            self.figures.cases += cases
            self.figures.bytes_checked += bytes_checked
            if self.figures.cases >= self.busy_after:
                self.busy.set()

    # -- allocation in either mode ----------------------------------------------------------------
    def allocate(self, size_bytes: int, tag: str, device: int) -> int:
        if not self.global_mode:
            return self.allocator.allocate(size_bytes, tag=tag, device=device)
        from gpusleep import _C

        previous = _C.set_current_tag(tag)
        try:
            address = _C.torch_malloc(size_bytes, device, LEGACY_STREAM)
        finally:
            _C.set_current_tag(previous)
        if not address:
            reason = _C.last_torch_error()
            if "asleep" in reason or "closed" in reason or "installed" in reason:
                raise gpusleep.SleepStateError(reason)
            raise RuntimeError(f"torch_malloc({size_bytes}, tag={tag!r}) returned 0: {reason}")
        return address

    def free(self, address: int, size_bytes: int, device: int) -> None:
        if not self.global_mode:
            self.allocator.free(address)
            return
        from gpusleep import _C

        _C.torch_free(address, size_bytes, device, LEGACY_STREAM)


def _ends_the_closing_phase(race: Race, error: BaseException) -> bool:
    """Once close() runs, a worker stops on the allocator's "closed" error, or on the driver refusing a copy
    to memory that close() just unmapped (the user's bug: writing to memory after closing its allocator)."""
    if not race.closing.is_set():
        return False
    from fakecuda.harness import CudaCallError

    return (isinstance(error, gpusleep.SleepStateError) and "closed" in str(error)) or isinstance(error, CudaCallError)


def resident_worker(race: Race, seed: int, operations: int) -> None:
    """Allocates in the keep tag, writes, reads back, frees: no sleep or wake may change these bytes."""
    rng = random.Random(seed)
    device = seed % 2
    held: list[tuple[int, bytes]] = []
    try:
        for _ in range(operations):
            if held and (len(held) > 3 or rng.random() < 0.4):
                address, data = held.pop(rng.randrange(len(held)))
                if race.touch_memory:
                    got = race.fake.read(address, len(data), device=device)
                    if got != data and not race.closing.is_set():
                        race.record(
                            f"resident thread {seed}: {len(data)} bytes at {address:#x} changed during the race"
                        )
                    race.count(bytes_checked=len(data))
                race.count(cases=1)
                race.free(address, len(data), device)
            else:
                size = rng.choice([1, 4097, 300 * 1024, 2 * MiB + 3])
                address = race.allocate(size, "default", device)
                data = pattern(size, rng.randrange(1 << 30))
                if race.touch_memory:
                    race.fake.write(address, data, device=device)
                held.append((address, data))
                race.count(cases=1)
        for address, data in held:
            if race.touch_memory:
                if race.fake.read(address, len(data), device=device) != data and not race.closing.is_set():
                    race.record(f"resident thread {seed}: bytes at {address:#x} changed during the race")
                race.count(bytes_checked=len(data))
            race.free(address, len(data), device)
    except Exception as error:  # noqa: BLE001 - the closing phase ends workers with a closed error
        if not _ends_the_closing_phase(race, error):
            race.record(f"resident thread {seed}: {type(error).__name__}: {error}\n{traceback.format_exc()}")


def churn_worker(race: Race, seed: int, operations: int) -> None:
    """Allocates and frees in the sleepable tag: refused while it sleeps, frees allowed at any time."""
    rng = random.Random(seed)
    held: list[tuple[int, int]] = []
    try:
        for _ in range(operations):
            if held and rng.random() < 0.5:
                address, size = held.pop(rng.randrange(len(held)))
                race.free(address, size, 0)
            else:
                size = rng.choice([0, 513, 1 * MiB + 1, 3 * MiB])
                try:
                    held.append((race.allocate(size, "kv_cache", 0), size))
                except gpusleep.SleepStateError as refused:
                    if "asleep" not in str(refused):
                        raise
            race.count(cases=1)
        for address, size in held:
            race.free(address, size, 0)
    except Exception as error:  # noqa: BLE001
        if not _ends_the_closing_phase(race, error):
            race.record(f"churn thread {seed}: {type(error).__name__}: {error}\n{traceback.format_exc()}")


def sleeper_worker(race: Race, seed: int, operations: int) -> None:
    """Sleeps and wakes in random ways; ends awake unless the allocator closed under it."""
    rng = random.Random(seed)
    try:
        for _ in range(operations):
            choice = rng.random()
            if choice < 0.35:
                level = rng.choice([1, 2]) if choice < 0.1 else 1
                race.allocator.sleep(level=level)
                race.level2_sleeps += level == 2
            elif choice < 0.6:
                race.allocator.wake_up(tags=rng.choice([None, ["kv_cache"], ["kv_cache", "weights"]]))
            elif choice < 0.75:
                race.allocator.empty_cache()
            else:
                race.allocator.stats()
            race.count(cases=1)
        race.allocator.wake_up()
    except Exception as error:  # noqa: BLE001
        if not _ends_the_closing_phase(race, error):
            race.record(f"sleeper thread {seed}: {type(error).__name__}: {error}\n{traceback.format_exc()}")


def join_or_dump(threads: list[threading.Thread], what: str) -> None:
    for thread in threads:
        thread.join(JOIN_TIMEOUT_SECONDS)
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(
            f"{what}: threads {alive} still running after {JOIN_TIMEOUT_SECONDS} s: suspected deadlock "
            "(stacks of every thread dumped to stderr)",
            pytrace=False,
        )


def start(race: Race, operations: int, seed: int) -> list[threading.Thread]:
    workers = [
        (resident_worker, seed + 1),
        (resident_worker, seed + 2),
        (churn_worker, seed + 3),
        (churn_worker, seed + 4),
        (sleeper_worker, seed + 5),
    ]
    threads = [
        threading.Thread(target=fn, args=(race, s, operations), name=f"{fn.__name__}-{s}", daemon=True)
        for fn, s in workers
    ]
    for t in threads:
        t.start()
    return threads


@pytest.mark.timeout(300)
@pytest.mark.parametrize("global_mode", [False, True], ids=["low_level", "global_mode"])
def test_threads_race_allocate_free_sleep_wake_then_close(fake, global_mode):
    operations = OPERATIONS_PER_THREAD * campaign_scale()
    allocator = gpusleep.Allocator(log_transitions=False)
    if global_mode:
        allocator._core.set_mode("global")
    race = Race(fake, allocator, global_mode)
    race.figures.campaign = (
        f"threads/{'global_mode' if global_mode else 'low_level'}/gran{fake.granularity_bytes >> 20}MiB"
    )
    try:
        weights = []
        for i, size in enumerate([fake.granularity_bytes + 7, 3 * MiB + 1, 4096]):
            address = race.allocate(size, "weights", i % 2)
            data = pattern(size, 1000 + i)
            fake.write(address, data, device=i % 2)
            weights.append((address, data, i % 2))

        join_or_dump(start(race, operations, seed=10), "phase 1 (allocate/free/sleep/wake)")
        assert not race.errors, "\n".join(race.errors)
        allocator.wake_up()
        assert not allocator.is_sleeping
        for address, data, device in weights:
            expected = bytes(len(data)) if race.level2_sleeps else data  # level 2 discards, the wake zero-fills
            assert fake.read(address, len(data), device=device) == expected, (
                f"weights at {address:#x} are not what {race.level2_sleeps} level-2 sleeps leave"
            )
            race.count(bytes_checked=len(data))

        race.busy.clear()
        race.busy_after = race.figures.cases + operations  # close once the workers are well into it
        race.touch_memory = False
        threads = start(race, operations, seed=20)
        race.busy.wait(JOIN_TIMEOUT_SECONDS)
        race.closing.set()
        allocator.close()
        join_or_dump(threads, "phase 2 (close during the race)")
        assert not race.errors, "\n".join(race.errors)
    finally:
        allocator.close()
    leak = leak_report(fake)
    race.figures.leaks += leak is not None
    race.figures.publish()
    assert leak is None, f"after close(): {leak}"
    assert not fake.violations(), fake.violations()

"""The sleep state machine: repeated calls, misuse, tags and frees while asleep."""

from __future__ import annotations

import threading

import pytest
from helpers import MiB, pattern

import gpusleep


def test_sleep_twice_at_the_same_level_is_a_no_op(alloc, fake):
    alloc.allocate(1 * MiB, tag="weights")
    alloc.sleep(level=1)
    copies = fake.call_count("cuMemcpyDtoHAsync_v2")
    again = alloc.sleep(level=1)
    assert again.tags == () and again.bytes_freed == 0
    assert fake.call_count("cuMemcpyDtoHAsync_v2") == copies
    assert alloc.is_sleeping


def test_deeper_level_drops_the_host_copies(alloc, fake):
    size = 1 * MiB
    weights = alloc.allocate(size, tag="weights")
    fake.write(weights, pattern(size, 1))
    alloc.sleep(level=1)
    assert alloc.stats().bytes_backed_up == size
    deeper = alloc.sleep(level=2)
    assert deeper.tags == ("weights",)
    assert alloc.stats().bytes_backed_up == 0
    assert alloc.stats().host.bytes_in_use == 0
    alloc.wake_up()
    assert fake.read(weights, size) == bytes(size)


def test_shallower_level_while_deeply_asleep_keeps_level_2(alloc, fake):
    alloc.allocate(1 * MiB, tag="weights")
    alloc.sleep(level=2)
    assert alloc.sleep(level=1).tags == ()
    assert alloc.stats().bytes_backed_up == 0


def test_waking_while_awake_is_a_no_op(alloc, fake):
    alloc.allocate(1 * MiB, tag="weights")
    creates = fake.call_count("cuMemCreate")
    report = alloc.wake_up()
    assert report.tags == () and report.bytes_mapped == 0
    assert fake.call_count("cuMemCreate") == creates


@pytest.mark.parametrize("level", [0, 3, -1, True, 1.5, "1"])
def test_invalid_level_is_a_value_error(alloc, level):
    with pytest.raises(ValueError, match="level"):
        alloc.sleep(level=level)


def test_offload_tags_with_level_2_is_a_value_error(alloc):
    with pytest.raises(ValueError):
        alloc.sleep(level=2, offload_tags=["weights"])


def test_wake_of_an_unknown_tag_is_a_value_error(alloc):
    alloc.allocate(1 * MiB, tag="weights")
    alloc.sleep()
    with pytest.raises(ValueError, match="unknown tag 'nope'"):
        alloc.wake_up(tags=["nope"])
    assert alloc.is_sleeping


def test_allocating_from_a_sleeping_tag_is_refused(alloc, fake):
    alloc.allocate(1 * MiB, tag="kv_cache")
    alloc.sleep(level=1)
    with pytest.raises(gpusleep.SleepStateError, match="kv_cache"):
        alloc.allocate(1 * MiB, tag="kv_cache")
    with pytest.raises(gpusleep.SleepStateError):
        with alloc.tag("kv_cache"):
            pass
    alloc.allocate(1 * MiB, tag="other-awake-tag")  # other tags still allocate
    alloc.wake_up(tags=["kv_cache"])
    alloc.allocate(1 * MiB, tag="kv_cache")


def test_free_while_asleep_releases_range_and_host_copy(alloc, fake):
    size = 2 * MiB
    weights = alloc.allocate(size, tag="weights")
    keep = alloc.allocate(size, tag="weights")
    fake.write(keep, pattern(size, 2))
    alloc.sleep(level=1)
    assert alloc.stats().host.bytes_in_use == 2 * size
    alloc.free(weights)
    assert alloc.stats().host.bytes_in_use == size
    assert alloc.stats().tags["weights"].allocations == 1
    alloc.wake_up()
    assert fake.read(keep, size) == pattern(size, 2)
    assert fake.used_bytes(0) == alloc.stats().tags["weights"].bytes_mapped


def test_double_free_raises_and_does_not_crash(alloc, fake):
    address = alloc.allocate(1 * MiB, tag="weights")
    alloc.free(address)
    with pytest.raises(ValueError, match="not a live allocation"):
        alloc.free(address)
    with pytest.raises(ValueError):
        alloc.free(12345)
    alloc.sleep(level=1)
    with pytest.raises(ValueError):
        alloc.free(address)


def test_negative_size_and_bad_tag_are_value_errors(alloc):
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    with pytest.raises(ValueError):
        alloc.allocate(10, tag="")
    with pytest.raises(ValueError):
        with alloc.tag(""):
            pass


def test_closed_allocator_refuses_work(fake):
    allocator = gpusleep.Allocator()
    allocator.allocate(1 * MiB, tag="weights")
    allocator.close()
    assert fake.used_bytes(0) == 0
    with pytest.raises(gpusleep.SleepStateError, match="closed"):
        allocator.allocate(1)
    allocator.close()  # idempotent


def test_zero_byte_allocations_have_unique_addresses(alloc, fake):
    a = alloc.allocate(0, tag="weights")
    b = alloc.allocate(0, tag="weights")
    assert a != b and a and b
    assert fake.used_bytes(0) == 0
    alloc.sleep()
    alloc.wake_up()
    alloc.free(a)
    alloc.free(b)


# ------------------------------------------------------------------------------------------- tags
def test_tags_nest_and_restore(alloc):
    assert alloc.current_tag() == "default"
    with alloc.tag("weights"):
        assert alloc.current_tag() == "weights"
        with alloc.tag("kv_cache"):
            assert alloc.current_tag() == "kv_cache"
        assert alloc.current_tag() == "weights"
    assert alloc.current_tag() == "default"


def test_tag_is_restored_on_exception(alloc):
    with pytest.raises(RuntimeError):
        with alloc.tag("weights"):
            with alloc.tag("kv_cache"):
                raise RuntimeError("boom")
    assert alloc.current_tag() == "default"


def test_allocate_uses_the_current_tag(alloc, fake):
    with alloc.tag("weights"):
        address = alloc.allocate(1 * MiB)
    assert alloc.stats().tags["weights"].allocations == 1
    alloc.free(address)


def test_tags_are_isolated_between_threads(alloc):
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def worker():
        with alloc.tag("worker-tag"):
            seen["worker"] = alloc.current_tag()
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    seen["main"] = alloc.current_tag()
    release.set()
    thread.join()
    assert seen == {"worker": "worker-tag", "main": "default"}


def test_allocator_as_context_manager_closes(fake):
    with gpusleep.Allocator() as allocator:
        allocator.allocate(1 * MiB, tag="weights")
        assert fake.used_bytes(0) > 0
    assert fake.used_bytes(0) == 0


def test_sleep_wake_and_pinning_log_one_line_each(alloc, fake, caplog):
    alloc.allocate(1 * MiB, tag="weights")
    with caplog.at_level("INFO", logger="gpusleep"):
        alloc.reserve_host_memory()
        alloc.sleep(level=1)
        alloc.wake_up()
    lines = [r.getMessage() for r in caplog.records if r.name == "gpusleep"]
    assert len(lines) == 3
    assert lines[0].startswith("reserve_host_memory: pinned")
    assert lines[1].startswith("sleep(level=1): offloaded 1.00 MiB in") and "GPU memory freed" in lines[1]
    assert lines[2].startswith("wake_up(tags=['weights']): restored")


def test_sleep_of_named_tags_leaves_the_others_as_they_are(alloc, fake):
    from helpers import MiB, pattern

    alloc.set_policy("scratch", "keep")
    weights = alloc.allocate(MiB, tag="weights")
    kv = alloc.allocate(MiB, tag="kv_cache")
    scratch = alloc.allocate(MiB, tag="scratch")
    for i, address in enumerate((weights, kv, scratch)):
        fake.write(address, pattern(MiB, i))
    report = alloc.sleep(level=1, offload_tags=["scratch"], tags=["scratch"])
    assert alloc.sleeping_tags == {"scratch"}, "a named 'keep' tag sleeps; unnamed tags stay awake"
    assert report.bytes_offloaded == MiB
    assert fake.read(weights, MiB) == pattern(MiB, 0) and fake.read(kv, MiB) == pattern(MiB, 1)
    alloc.sleep(level=1, tags=["kv_cache"])
    assert alloc.sleeping_tags == {"scratch", "kv_cache"}
    alloc.wake_up()
    assert fake.read(scratch, MiB) == pattern(MiB, 2)
    with pytest.raises(ValueError, match="unknown tag"):
        alloc.sleep(level=1, tags=["nope"])


def test_the_host_copy_can_be_read_while_asleep(alloc, fake):
    from helpers import MiB, pattern

    import gpusleep

    address = alloc.allocate(3 * MiB + 7, tag="weights")
    fake.write(address, pattern(3 * MiB + 7, 5))
    with pytest.raises(gpusleep.SleepStateError, match="no host"):
        alloc.read_host_backup(address, 16)
    alloc.sleep(level=1)
    assert alloc.read_host_backup(address + MiB, 2 * MiB + 7) == pattern(3 * MiB + 7, 5)[MiB:]
    with pytest.raises(ValueError, match="runs past"):
        alloc.read_host_backup(address + MiB, 2 * MiB + 8)
    with pytest.raises(ValueError, match="not inside"):
        alloc.read_host_backup(12345, 1)
    alloc.wake_up()


def test_plan_wake_is_a_dry_run_that_says_whether_the_memory_is_there(alloc, fake):
    from helpers import MiB

    alloc.allocate(3 * MiB, tag="weights", device=0)
    alloc.allocate(MiB, tag="kv_cache", device=1)
    alloc.sleep(level=1)
    plans = {p.device: p for p in alloc.plan_wake()}
    g = fake.granularity_bytes
    assert plans[0].bytes_needed == -(-3 * MiB // g) * g and plans[1].bytes_needed == -(-MiB // g) * g
    assert plans[0].bytes_free == fake.free_bytes(0) and plans[0].fits
    assert [p.device for p in alloc.plan_wake(tags=["kv_cache"])] == [1]
    fake.set_foreign_load(0, fake.free_bytes(0) - MiB)
    assert not {p.device: p for p in alloc.plan_wake()}[0].fits
    assert alloc.sleeping_tags == {"weights", "kv_cache"} and fake.used_bytes(0) == 0, "nothing changed"
    fake.set_foreign_load(0, 0)
    alloc.wake_up()
    assert alloc.plan_wake() == ()


def test_stats_report_every_counter_of_the_core_list_from_the_start(alloc):
    """Note [Typed counters]: every counter is reported, 0 until its event happens, and events count."""
    from gpusleep import _C

    names = [name for name, _ in _C.counter_descriptions()]
    assert len(names) == len(set(names))
    counters = alloc.stats().counters
    assert list(counters) == names
    assert all(counters[n] == 0 for n in names if n not in ("teardown_failures", "release_refused"))
    alloc.allocate(1 << 20, tag="weights")
    alloc.sleep(level=1)
    alloc.wake_up()
    counters = alloc.stats().counters
    assert counters["sleeps"] == 1 and counters["wakes"] == 1 and counters["segments_created"] == 1
    assert counters["segments_live"] == 1 and counters["failed_sleeps"] == 0

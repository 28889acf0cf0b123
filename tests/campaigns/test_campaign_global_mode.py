"""Stateful property test of global mode: the caching arena driven through the PyTorch entry points
(``_C.torch_malloc`` / ``_C.torch_free``, tagged with ``_C.set_current_tag``) against the plain model.

Hypothesis drives random sequences of small, medium and large blocks (sizes that land in the granularity
tail of a segment included), frees (also while asleep), writes, policy changes, sleep(1|2, offload_tags),
wake_up(tags, zero_fill), empty_cache, host memory and close. Checked after every step: the sleeping tags,
per-tag live blocks, sleeping tags mapping nothing, the GPU memory the driver counts equal to what the stats
say is mapped, the cache inside it, the host backups; after each wake EVERY requested byte of EVERY live
block of an offloaded tag reads back as written, at the same address, and zeros for discarded tags woken
with zero_fill. close() must leave nothing behind.
"""

from __future__ import annotations

import pytest
from campaign_model import (
    DEVICES,
    TAGS,
    CampaignFigures,
    MiB,
    World,
    _state_machine_base,
    leak_report,
    read_back,
    state_machine_settings,
)
from hypothesis import strategies as st
from hypothesis.stateful import consumes, invariant, multiple, precondition, rule, run_state_machine_as_test

EXAMPLES = 50  # per granularity, times $GPUSLEEP_CAMPAIGN_SCALE
STEPS = 50
LEGACY_STREAM = 0

block_sizes = st.one_of(
    st.sampled_from([0, 1, 511, 512, 513, 4097, 300 * 1024]),  # small pool (2 MiB segments)
    st.integers(1 * MiB + 1, 10 * MiB - 1),  # medium pool (20 MiB segments)
    st.integers(10 * MiB, 13 * MiB),  # a segment of its own, rounded up: the tail is free for later blocks
    st.sampled_from([5 * MiB // 4, 3 * MiB // 2]),  # fits the tail of a large segment
)

Base = _state_machine_base()


class GlobalModeMachine(Base):
    global_mode = True

    @precondition(lambda self: not self.closed)
    @rule(target=Base.blocks, size=block_sizes, tag=st.sampled_from(TAGS), device=st.sampled_from(DEVICES))
    def torch_malloc(self, size, tag, device):
        from gpusleep import _C

        if self.model.is_asleep(tag):
            previous = _C.set_current_tag(tag)
            try:
                assert _C.torch_malloc(size, device, LEGACY_STREAM) == 0, f"torch_malloc from the sleeping tag {tag!r}"
            finally:
                _C.set_current_tag(previous)
            assert tag in _C.last_torch_error() and "asleep" in _C.last_torch_error()
            return multiple()
        block = self.world.torch_malloc(size, tag, device)
        assert block.address % 512 == 0, f"torch_malloc({size}) returned {block.address:#x}, not 512-byte aligned"
        for other in self.model.blocks.values():
            if other is not block and other.device == device:
                assert (
                    block.address + max(size, 1) <= other.address
                    or other.address + max(other.size_bytes, 1) <= block.address
                ), f"block at {block.address:#x} ({size} bytes) overlaps the live one at {other.address:#x}"
        return block.address

    @precondition(lambda self: not self.closed)
    @rule(address=consumes(Base.blocks))
    def torch_free(self, address):
        block = self.live(address)
        if block is not None:
            self.world.torch_free(block)

    @precondition(lambda self: not self.closed)
    @rule()
    def empty_cache(self):
        """Returns the cached segments that hold no live block: their GPU memory if awake, their
        reservation (and host copy) if asleep. The bytes it reports are the segments' bytes."""
        before = self.world.allocator.stats()
        used = sum(self.fake.used_bytes(d) for d in DEVICES)
        released = self.world.allocator.empty_cache()
        after = self.world.allocator.stats()
        gpu_released = used - sum(self.fake.used_bytes(d) for d in DEVICES)
        retried = before.bytes_release_pending - after.bytes_release_pending  # refused earlier, released now
        assert gpu_released == before.bytes_mapped - after.bytes_mapped + retried, "the stats follow the GPU memory"
        gpu_released -= retried
        assert released == gpu_released + before.bytes_asleep - after.bytes_asleep, (
            f"empty_cache() said {released} bytes; GPU memory released {gpu_released}, asleep bytes "
            f"{before.bytes_asleep} -> {after.bytes_asleep}"
        )
        assert gpu_released <= before.bytes_cached, (
            f"released {gpu_released} bytes of GPU memory, {before.bytes_cached} were cached"
        )
        for name, t in after.tags.items():
            live = [b for b in self.model.blocks.values() if b.tag == name]
            assert t.allocations == len(live)

    @invariant()
    def gpu_memory_matches_the_stats(self):
        if self.closed:
            return
        stats = self.world.allocator.stats()
        used = sum(self.fake.used_bytes(d) for d in DEVICES)
        assert used == stats.bytes_mapped + stats.bytes_release_pending, (
            f"the driver holds {used} bytes, the stats say {stats.bytes_mapped} are mapped and "
            f"{stats.bytes_release_pending} refused by the driver, pending"
        )
        # Cache while asleep: test_cached_bytes_are_mapped_bytes_even_while_asleep (kept apart so that this
        # machine goes on exploring past that known stats defect).
        assert stats.bytes_cached <= stats.bytes_mapped + stats.bytes_asleep
        for name in self.model.tags:
            got = stats.tags.get(name)
            if got is None:
                continue
            live = [b for b in self.model.blocks.values() if b.tag == name]
            awake_bytes = sum(max(b.size_bytes, 1) for b in live if b.state == "mapped")
            assert got.bytes_mapped >= awake_bytes, (
                f"tag {name!r} maps {got.bytes_mapped} bytes for {awake_bytes} of live blocks"
            )
            offloaded = sum(b.size_bytes for b in live if b.state == "offloaded")
            assert got.bytes_backed_up >= offloaded, (
                f"tag {name!r} backs up {got.bytes_backed_up} bytes for {offloaded} of live blocks"
            )


def test_global_mode_agrees_with_the_model(fake):
    figures = CampaignFigures(f"global_mode_state_machine/gran{fake.granularity_bytes >> 20}MiB")
    machine = type("GlobalModeMachineOnTheDouble", (GlobalModeMachine,), {"fake": fake, "figures": figures})
    run_state_machine_as_test(machine, settings=state_machine_settings(EXAMPLES, STEPS))
    figures.publish()
    assert figures.leaks == 0


def test_every_byte_of_blocks_in_the_granularity_tail_comes_back_after_a_level1_sleep(fake):
    """10.5 MiB gets a segment of its own, rounded up to the granularity (12 MiB); the next 1.25 MiB block
    of the same tag is carved from that segment's tail, beyond the 10.5 MiB asked for. A level-1 sleep must
    copy the tail too (docs/invariants.md, invariant 2: every byte a live block can hold)."""
    world = World.create(fake, global_mode=True)
    try:
        big = world.torch_malloc(21 * MiB // 2, "weights")
        tail = world.torch_malloc(5 * MiB // 4, "weights")
        small = world.torch_malloc(4096, "weights")
        world.allocator.sleep(level=1)
        world.model.sleep(1)
        world.allocator.wake_up()
        world.model.wake()
        for block in (big, small, tail):
            read_back(fake, [block])
    finally:
        world.allocator.close()
    assert leak_report(fake) is None, leak_report(fake)


@pytest.mark.parametrize("level", [1, 2])
def test_a_block_freed_while_asleep_gives_back_its_segment_and_its_host_copy(fake, level):
    """The small block lives in the small pool; the 12 MiB one in a segment of its own, which becomes
    entirely free when the block is freed while its tag sleeps: empty_cache() returns it, host copy too."""
    world = World.create(fake, global_mode=True)
    try:
        world.torch_malloc(300 * 1024, "weights")
        gone = world.torch_malloc(12 * MiB, "weights")
        world.allocator.sleep(level=level)
        world.model.sleep(level)
        before = world.allocator.stats().tags["weights"]
        world.torch_free(gone)
        released = world.allocator.empty_cache()
        after = world.allocator.stats().tags["weights"]
        assert released >= 12 * MiB, f"empty_cache() released {released} bytes while the tag sleeps"
        assert after.bytes_asleep == before.bytes_asleep - released
        if level == 1:
            assert after.bytes_backed_up <= before.bytes_backed_up - 12 * MiB, "the host copy of the segment is freed"
        assert world.allocator.stats().host.bytes_in_use == after.bytes_backed_up
        world.allocator.wake_up()
        world.model.wake()
        read_back(fake, world.model.readable_blocks())
        assert sum(fake.used_bytes(d) for d in DEVICES) == after.bytes_asleep
    finally:
        world.allocator.close()
    assert leak_report(fake) is None, leak_report(fake)


@pytest.mark.parametrize("level", [1, 2])
def test_cached_bytes_are_mapped_bytes_even_while_asleep(fake, level):
    """stats().bytes_cached is documented as "mapped bytes held in free arena blocks": while a tag sleeps,
    the free part of its segments is not mapped, so it cannot be counted as cached GPU memory (today a
    sleeping 2 MiB segment with one 512-byte block reports 2 MiB - 512 cached and 0 mapped)."""
    world = World.create(fake, global_mode=True)
    try:
        world.torch_malloc(512, "weights")
        world.torch_malloc(3 * MiB, "kv_cache")
        world.allocator.sleep(level=level)
        stats = world.allocator.stats()
        assert stats.bytes_mapped == 0 and sum(fake.used_bytes(d) for d in DEVICES) == 0
        assert stats.bytes_cached <= stats.bytes_mapped, (
            f"bytes_cached={stats.bytes_cached} while bytes_mapped={stats.bytes_mapped} (everything is asleep)"
        )
        world.allocator.wake_up()
    finally:
        world.allocator.close()
    assert leak_report(fake) is None, leak_report(fake)

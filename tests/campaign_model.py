"""What the reliability campaigns share: a plain Python model of the allocator, the observation of the
driver double, and the figures each campaign records.

The model says what a user may rely on (docs/invariants.md, invariants 1 to 4), not how the core does it:
- an allocation keeps its address for its whole life;
- a level-1 sleep keeps the bytes of the offloaded tags, a discard loses them, and a wake brings back
  zeros (``zero_fill=True``) or undefined bytes (``zero_fill=False``);
- while a tag is awake its allocations hold ``round_up(size, granularity)`` bytes of GPU memory and none
  while it sleeps.

Used by tests/campaigns/test_campaign_*.py and by tests/campaigns/soak.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

MiB = 1 << 20
DEVICES = (0, 1)
CAPACITY_BYTES = 1 << 30  # per device, as in the conftest `fake` fixture
OUT_OF_MEMORY = 2  # CUDA_ERROR_OUT_OF_MEMORY
UNKNOWN_ERROR = 999  # CUDA_ERROR_UNKNOWN
FAULT_CODES = (OUT_OF_MEMORY, UNKNOWN_ERROR)
DEFAULT_POLICIES = {"weights": "offload", "default": "keep"}  # every other tag: "discard"


def campaign_scale() -> int:
    """$GPUSLEEP_CAMPAIGN_SCALE (default 1, the CI size): multiplies examples, cycles and scenario sizes."""
    raw = os.environ.get("GPUSLEEP_CAMPAIGN_SCALE", "1")
    try:
        scale = int(raw)
    except ValueError:
        raise ValueError(f"GPUSLEEP_CAMPAIGN_SCALE must be a positive integer, got {raw!r}") from None
    if scale < 1:
        raise ValueError(f"GPUSLEEP_CAMPAIGN_SCALE must be a positive integer, got {raw!r}")
    return scale


def round_up(num_bytes: int, multiple_bytes: int) -> int:
    return (num_bytes + multiple_bytes - 1) // multiple_bytes * multiple_bytes


PAGE_BYTES = 4096


def pattern(num_bytes: int, seed: int) -> bytes:
    """Deterministic bytes that differ from page to page and from seed to seed: each 4 KiB page starts with
    its (seed, page index) and goes on with random bytes of the seed. A page copied to the wrong offset or
    from another allocation, a shift inside a page, zeros and the double's 0xA5 poison all show. Much
    cheaper than random bytes throughout, which matters for gigabytes of checks."""
    body = random.Random(seed).randbytes(PAGE_BYTES - 16)
    pages = (num_bytes + PAGE_BYTES - 1) // PAGE_BYTES
    data = b"".join(struct.pack("<QQ", seed, i) + body for i in range(pages))
    return data[:num_bytes]


# --------------------------------------------------------------------------------------------- figures


@dataclass
class CampaignFigures:
    """What one campaign run did: the counts docs/reliability.md reports."""

    campaign: str
    cases: int = 0  #: examples, fault cases or cycles run
    faults_injected: int = 0  #: driver calls made to fail
    bytes_checked: int = 0  #: device bytes read back and compared with the model
    leaks: int = 0  #: cases that left driver objects or GPU memory behind

    def add(self, other: CampaignFigures) -> None:
        self.cases += other.cases
        self.faults_injected += other.faults_injected
        self.bytes_checked += other.bytes_checked
        self.leaks += other.leaks

    def summary(self) -> str:
        return (
            f"{self.campaign}: cases={self.cases} faults_injected={self.faults_injected} "
            f"bytes_checked={self.bytes_checked} leaks={self.leaks}"
        )

    def publish(self) -> None:
        """Appends one JSON line to $GPUSLEEP_CAMPAIGN_FIGURES when set (how docs/reliability.md's figures
        are collected); always prints the summary (shown by ``pytest -s``)."""
        print(self.summary())
        path = os.environ.get("GPUSLEEP_CAMPAIGN_FIGURES")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(dataclasses.asdict(self)) + "\n")


# ----------------------------------------------------------------------------------------------- model


@dataclass
class BlockModel:
    """One live allocation: what the user may expect to read at ``address``."""

    address: int
    size_bytes: int
    tag: str
    device: int
    content: bytes | None  #: None: undefined (fresh memory, or woken with zero_fill=False)
    state: str = "mapped"  #: "mapped", "offloaded" (host copy held) or "discarded"


@dataclass
class TagModel:
    policy: str
    asleep: bool = False
    level: int = 0


@dataclass
class AllocatorModel:
    """The allocator as a user sees it. ``physical_bytes`` is the granularity rounding of the low-level API;
    global mode checks memory through the stats instead (its segments are the arena's business)."""

    granularity_bytes: int
    tags: dict[str, TagModel] = field(default_factory=dict)
    blocks: dict[int, BlockModel] = field(default_factory=dict)
    tags_with_memory_ever: set[str] = field(default_factory=set)  #: tags that were ever allocated from

    def clone(self) -> AllocatorModel:
        return copy.deepcopy(self)

    # -- tags ---------------------------------------------------------------------------------------
    def tag(self, name: str) -> TagModel:
        if name not in self.tags:
            self.tags[name] = TagModel(policy=DEFAULT_POLICIES.get(name, "discard"))
        return self.tags[name]

    def set_policy(self, name: str, policy: str) -> None:
        self.tag(name).policy = policy

    def sleeping_tags(self) -> frozenset[str]:
        return frozenset(name for name, t in self.tags.items() if t.asleep)

    def is_asleep(self, name: str) -> bool:
        return name in self.tags and self.tags[name].asleep

    # -- allocations --------------------------------------------------------------------------------
    def allocate(self, address: int, size_bytes: int, tag: str, device: int, content: bytes | None) -> BlockModel:
        assert address not in self.blocks, f"address {address:#x} handed out twice"
        self.tag(tag)
        self.tags_with_memory_ever.add(tag)
        block = BlockModel(address, size_bytes, tag, device, content)
        self.blocks[address] = block
        return block

    def free(self, address: int) -> BlockModel:
        return self.blocks.pop(address)

    def physical_bytes(self, block: BlockModel) -> int:
        return round_up(block.size_bytes, self.granularity_bytes)

    def mapped_bytes(self, device: int) -> int:
        return sum(self.physical_bytes(b) for b in self.blocks.values() if b.device == device and b.state == "mapped")

    def readable_blocks(self) -> list[BlockModel]:
        """Blocks whose bytes are defined and readable now."""
        return [b for b in self.blocks.values() if b.state == "mapped" and b.content is not None]

    # -- sleep and wake -----------------------------------------------------------------------------
    def sleep(self, level: int, offload_tags: Iterable[str] | None = None) -> list[str]:
        """The plan of Allocator.sleep: returns the tags put to sleep or deepened."""
        listed_tags = None if offload_tags is None else list(offload_tags)
        for block in self.blocks.values():
            self.tag(block.tag)
        for name in listed_tags or ():
            self.tag(name)
        actions: dict[str, str] = {}
        for name, t in self.tags.items():
            listed = listed_tags is not None and name in listed_tags
            if not listed and t.policy == "keep":
                continue
            if t.asleep:
                if level == 2 and t.level == 1:
                    actions[name] = "drop_backup"
                continue
            offload = level == 1 and (listed if listed_tags is not None else t.policy == "offload")
            actions[name] = "offload" if offload else "discard"
        for block in self.blocks.values():
            action = actions.get(block.tag)
            if action == "offload" and block.state == "mapped":
                block.state = "offloaded"
            elif action == "discard" and block.state == "mapped":
                block.state, block.content = "discarded", None
            elif action == "drop_backup" and block.state == "offloaded":
                block.state, block.content = "discarded", None
        for name, action in actions.items():
            t = self.tags[name]
            t.asleep = True
            t.level = 2 if action == "drop_backup" else level
        return sorted(actions)

    def wake(self, tags: Iterable[str] | None = None, zero_fill: bool = True) -> list[str]:
        """The plan of Allocator.wake_up: raises KeyError for an unknown tag; returns the tags woken."""
        if tags is None:
            targets = sorted(self.sleeping_tags())
        else:
            targets = []
            for name in tags:
                if name not in self.tags:
                    raise KeyError(name)
                if self.tags[name].asleep and name not in targets:
                    targets.append(name)
        for block in self.blocks.values():
            if block.tag in targets and block.state != "mapped":
                if block.state == "discarded":
                    block.content = bytes(block.size_bytes) if zero_fill else None
                block.state = "mapped"
        for name in targets:
            self.tags[name].asleep, self.tags[name].level = False, 0
        return targets

    def backed_up_bytes(self, tag: str) -> int:
        return sum(b.size_bytes for b in self.blocks.values() if b.tag == tag and b.state == "offloaded")


# ------------------------------------------------------------------------------------------ observation


def read_back(fake, blocks: Iterable[BlockModel]) -> int:
    """Reads every defined byte of ``blocks`` at their addresses and compares it with the model. Returns the
    bytes checked; raises AssertionError naming the first block whose bytes differ."""
    checked = 0
    for block in blocks:
        if block.content is None or block.size_bytes == 0:
            continue
        got = fake.read(block.address, block.size_bytes, device=block.device)
        if got != block.content:
            first = next(i for i, (a, b) in enumerate(zip(got, block.content, strict=False)) if a != b)
            raise AssertionError(
                f"tag {block.tag!r}: {block.size_bytes} bytes at {block.address:#x} (device {block.device}) differ "
                f"from what was written, first at offset {first} of {block.size_bytes} "
                f"(read {got[first]:#04x}, expected {block.content[first]:#04x})"
            )
        checked += block.size_bytes
    return checked


def leak_report(fake) -> str | None:
    """None when the double holds no GPU memory and no driver object; else what it still holds."""
    used = {d: fake.used_bytes(d) for d in DEVICES}
    live = fake.live_object_count()
    if any(used.values()) or live:
        return f"used bytes per device {used}, {live} live driver objects: {fake.live_objects()}"
    return None


def reset_driver(fake, seed: int) -> None:
    """A fresh double with the granularity it had (2 devices of 1 GiB). Leaks were checked before."""
    try:
        fake.configure(
            devices=len(DEVICES), capacity_bytes=CAPACITY_BYTES, granularity_bytes=fake.granularity_bytes, seed=seed
        )
    except AssertionError:
        pass  # configure() resets anyway; the caller has reported the leak already
    fake.clear_violations()
    fake.clear_faults()
    # A case whose fault hit the restore of the caller's context leaves another context current on this
    # thread; start every case from none, so that each one makes the same driver calls.
    fake.lib.cuCtxSetCurrent(None)


def close_quietly(allocator) -> None:
    """Closes ``allocator`` after a failed case, so the next case starts clean; errors were reported."""
    try:
        allocator.close()
    except Exception:  # noqa: BLE001 - the case has failed already and says why
        pass


# ------------------------------------------------------------------------------------------- the world


@dataclass
class World:
    """One allocator on the double, and the model of what it holds."""

    fake: object
    allocator: object  #: gpusleep.Allocator
    model: AllocatorModel
    global_mode: bool = False
    next_seed: int = 1

    @classmethod
    def create(cls, fake, *, global_mode: bool = False) -> World:
        import gpusleep

        g = fake.granularity_bytes
        # Low-level: segments of several chunks. Global mode: the default chunks (its segments are 2 to 20 MiB
        # and more, and chunking is the same code). Two copy streams per device (four only repeat calls).
        allocator = gpusleep.Allocator(chunk_bytes=0 if global_mode else g, copy_streams=2, log_transitions=False)
        if global_mode:
            allocator._core.set_mode("global")
        return cls(fake, allocator, AllocatorModel(granularity_bytes=g), global_mode)

    def _content(self, size_bytes: int) -> bytes:
        self.next_seed += 1
        return pattern(size_bytes, self.next_seed)

    def allocate(self, size_bytes: int, tag: str, device: int = 0) -> BlockModel:
        """Low-level allocate, then fill every byte with a pattern."""
        address = self.allocator.allocate(size_bytes, tag=tag, device=device)
        content = self._content(size_bytes)
        self.fake.write(address, content, device=device)
        return self.model.allocate(address, size_bytes, tag, device, content)

    def torch_malloc(self, size_bytes: int, tag: str, device: int = 0, fill: bool = True) -> BlockModel:
        """Global mode: the PyTorch malloc entry point under ``tag``, then fill the requested bytes (unless
        ``fill`` is False: their content is then undefined)."""
        from gpusleep import _C

        previous = _C.set_current_tag(tag)
        try:
            address = _C.torch_malloc(size_bytes, device, 0)
        finally:
            _C.set_current_tag(previous)
        if not address:
            raise MemoryError(f"torch_malloc({size_bytes}, tag={tag!r}, device={device}): {_C.last_torch_error()}")
        content = self._content(size_bytes) if fill else None
        if content is not None:
            self.fake.write(address, content, device=device)
        return self.model.allocate(address, size_bytes, tag, device, content)

    def torch_free(self, block: BlockModel) -> None:
        from gpusleep import _C

        _C.torch_free(block.address, block.size_bytes, block.device, 0)
        self.model.free(block.address)

    def blocks_of(self, tag: str) -> list[BlockModel]:
        return [b for b in self.model.blocks.values() if b.tag == tag]


@dataclass(frozen=True)
class Observation:
    """What can be seen of the allocator from outside, addresses aside (those are checked by reading)."""

    sleeping_tags: frozenset[str]
    used_bytes: tuple[int, ...]  #: per device, as the driver counts it
    tags: tuple[tuple[str, int, int, int, int], ...]  #: (tag, allocations, mapped, asleep, backed up) bytes
    host_bytes_in_use: int  #: pinned host memory holding backups
    bytes_release_pending: int = 0  #: GPU memory the driver refused to release, kept and reported

    @classmethod
    def of(cls, world: World) -> Observation:
        stats = world.allocator.stats()
        return cls(
            sleeping_tags=frozenset(world.allocator.sleeping_tags),
            used_bytes=tuple(world.fake.used_bytes(d) for d in DEVICES),
            tags=tuple(
                (t.tag, t.allocations, t.bytes_mapped, t.bytes_asleep, t.bytes_backed_up)
                for t in sorted(stats.tags.values(), key=lambda t: t.tag)
            ),
            host_bytes_in_use=stats.host.bytes_in_use,
            bytes_release_pending=getattr(stats, "bytes_release_pending", 0),
        )

    def differences(self, expected: Observation, *, global_mode: bool) -> list[str]:
        """How this state differs from ``expected``; empty when it is that state.

        GPU memory the driver refused to release may be held beyond the expected figure, if and only if the
        allocator reports it (``bytes_release_pending``): kept, counted and retried is the promise (issue 9),
        forgotten is not. In global mode a sleep gives cached segments (no live block) back before its
        transaction, so a failed sleep may have returned them: per-tag mapped and asleep bytes may be
        lower than before, never higher; what they hold is checked by reading and by empty_cache()."""
        found = []
        if self.sleeping_tags != expected.sleeping_tags:
            found.append(f"sleeping tags {sorted(self.sleeping_tags)} (expected {sorted(expected.sleeping_tags)})")
        if self.host_bytes_in_use != expected.host_bytes_in_use:
            found.append(f"host bytes in use {self.host_bytes_in_use} (expected {expected.host_bytes_in_use})")
        # GPU memory the allocator accounts for: what the driver holds less what is reported pending (a
        # retry may have released refused objects since `expected` was seen).
        accounted = sum(self.used_bytes) - self.bytes_release_pending
        expected_accounted = sum(expected.used_bytes) - expected.bytes_release_pending
        if accounted > expected_accounted or (not global_mode and accounted != expected_accounted):
            found.append(
                f"GPU memory {self.used_bytes} with {self.bytes_release_pending} reported pending (expected "
                f"{expected.used_bytes} with {expected.bytes_release_pending} pending): "
                f"{accounted - expected_accounted} bytes held that the allocator does not account for"
            )
        got_tags = {t[0]: t for t in self.tags}
        want_tags = {t[0]: t for t in expected.tags}
        for name in sorted(set(got_tags) | set(want_tags)):
            got, want = got_tags.get(name, (name, 0, 0, 0, 0)), want_tags.get(name, (name, 0, 0, 0, 0))
            if global_mode:
                same = got[1] == want[1] and got[4] == want[4] and got[2] <= want[2] and got[3] <= want[3]
            else:
                same = got == want
            if not same:
                found.append(f"tag {name!r} (allocations, mapped, asleep, backed up) = {got[1:]} (expected {want[1:]})")
        return found


# ------------------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    """A state built by ``setup`` and one step, ``act``, whose driver calls the sweep makes fail in turn.
    ``expect`` does the same step on the model; ``closes`` marks the step that ends the allocator."""

    name: str
    setup: object  #: Callable[[World, int], None]; the int is the campaign scale
    act: object  #: Callable[[World], None]
    expect: object  #: Callable[[AllocatorModel], None]
    global_mode: bool = False
    closes: bool = False
    in_ci: bool = True  #: False: only from $GPUSLEEP_CAMPAIGN_SCALE=2 on, and in the soak (to fit the CI budget)


def populate(world: World, scale: int) -> None:
    """Odd sizes on both devices, several chunks per segment: weights (offload), kv_cache (discard) and
    default (keep)."""
    g = world.model.granularity_bytes
    for _ in range(scale):
        world.allocate(g + 100, "weights", 0)
        world.allocate(g - 1, "weights", 1)
        world.allocate(3, "weights", 0)
        world.allocate(g, "kv_cache", 0)
        world.allocate(0, "kv_cache", 1)
        world.allocate(5000, "default", 0)


def populate_global(world: World, scale: int) -> None:
    """Arena blocks of three tags in small (2 MiB) and medium (20 MiB) segments on both devices, plus two
    cached segments (whole segments without a live block) in the weights and kv_cache tags."""
    for _ in range(scale):
        world.torch_malloc(300 * 1024, "weights", 0)
        world.torch_malloc(3 * MiB + 5, "weights", 0)
        world.torch_malloc(512 * 1024 + 5, "weights", 1)
        world.torch_malloc(700 * 1024, "kv_cache", 0)
        world.torch_malloc(1 * MiB, "default", 0)
        # Whole free segments: on device 1 no pool of these sizes and tags has room for them.
        world.torch_free(world.torch_malloc(10 * MiB + 5, "weights", 1, fill=False))
        world.torch_free(world.torch_malloc(600 * 1024, "kv_cache", 1, fill=False))


def populate_global_short_of_memory(world: World, scale: int) -> None:
    """Global mode on device 0 only: weights and kv_cache blocks, and a cached segment of the resident
    "default" tag, which a wake short of GPU memory gives back first."""
    for _ in range(scale):
        world.torch_malloc(3 * MiB + 5, "weights", 0)
        world.torch_malloc(700 * 1024, "kv_cache", 0)
        world.torch_malloc(1 * MiB, "default", 0)
        world.torch_free(world.torch_malloc(10 * MiB + 5, "default", 0, fill=False))


def _leave_room_only_with_the_cache(world: World, scale: int) -> None:
    """Someone else takes GPU memory: the wake fits only once the cached segment is given back."""
    needed = world.allocator.stats().bytes_asleep
    world.fake.set_foreign_load(0, world.fake.free_bytes(0) - needed + MiB)


def _sleep(level: int):
    return (lambda w: w.allocator.sleep(level=level)), (lambda m: m.sleep(level))


def _then(*steps):
    def run(world: World, scale: int) -> None:
        for step in steps:
            step(world, scale)

    return run


def _sleep_setup(level: int):
    def run(world: World, scale: int) -> None:
        world.allocator.sleep(level=level)
        world.model.sleep(level)

    return run


def _allocate_scratch(world: World, scale: int) -> None:
    """A tag that did not exist at the first sleep is awake: the deeper sleep has something to release."""
    g = world.model.granularity_bytes
    for _ in range(scale):
        world.allocate(g + 1, "scratch", 0)
        world.allocate(g - 1, "scratch", 1)


def _free_first_weights(world: World) -> None:
    world.allocator.free(_first_weights(world.model).address)


def _first_weights(model: AllocatorModel) -> BlockModel:
    """The largest weights allocation (it holds a host copy of several chunks while asleep)."""
    return max((b for b in model.blocks.values() if b.tag == "weights"), key=lambda b: (b.size_bytes, b.address))


NEW_ALLOCATION = (3, "weights", 1)  # granules + 5 bytes, tag, device: several chunks on the second device


def _allocate_new(world: World) -> None:
    granules, tag, device = NEW_ALLOCATION
    world.allocator.allocate(granules * world.model.granularity_bytes + 5, tag=tag, device=device)


def _allocated_new(model: AllocatorModel) -> None:
    """The new allocation's address is not known in advance and its bytes are undefined: a placeholder."""
    granules, tag, device = NEW_ALLOCATION
    model.allocate(-1, granules * model.granularity_bytes + 5, tag, device, None)


def _close(world: World) -> None:
    world.allocator.close()


def _closed(model: AllocatorModel) -> None:
    model.blocks.clear()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("sleep_level1", populate, *_sleep(1)),
    Scenario("sleep_level2", populate, *_sleep(2)),
    Scenario("deepen_1_to_2", _then(populate, _sleep_setup(1), _allocate_scratch), *_sleep(2)),
    Scenario("wake", _then(populate, _sleep_setup(1)), lambda w: w.allocator.wake_up(), lambda m: m.wake()),
    Scenario(
        "staged_wake",
        _then(populate, _sleep_setup(1)),
        lambda w: w.allocator.wake_up(tags=["weights"]),
        lambda m: m.wake(["weights"]),
    ),
    Scenario("global_sleep_cached_segments", populate_global, *_sleep(1), global_mode=True),
    Scenario(
        "free_while_asleep",
        _then(populate, _sleep_setup(1)),
        _free_first_weights,
        lambda m: m.free(_first_weights(m).address),
    ),
    Scenario("close", _then(populate, _sleep_setup(1)), _close, _closed, closes=True),
    Scenario("allocate", populate, _allocate_new, _allocated_new),
    Scenario("free_awake", populate, _free_first_weights, lambda m: m.free(_first_weights(m).address)),
    Scenario(
        "global_wake_short_of_memory",
        _then(populate_global_short_of_memory, _sleep_setup(1), _leave_room_only_with_the_cache),
        lambda w: w.allocator.wake_up(),
        lambda m: m.wake(),
        global_mode=True,
        in_ci=False,
    ),
    Scenario(
        "global_wake",
        _then(populate_global, _sleep_setup(1)),
        lambda w: w.allocator.wake_up(),
        lambda m: m.wake(),
        global_mode=True,
    ),
)


# ---------------------------------------------------------------------------------------- fault cases


@dataclass(frozen=True)
class FaultPoint:
    """Fail the ``nth`` call (counted from the start of the step) of ``function`` with ``error``."""

    function: str
    nth: int
    error: int

    def describe(self) -> str:
        name = {OUT_OF_MEMORY: "CUDA_ERROR_OUT_OF_MEMORY", UNKNOWN_ERROR: "CUDA_ERROR_UNKNOWN"}.get(
            self.error, str(self.error)
        )
        return f"{self.function} call #{self.nth} failing with {name}"


@dataclass(frozen=True)
class Baseline:
    """The step run without a fault: its driver calls per entry point and the state it leads to."""

    calls: dict  #: entry point -> calls made by the step
    after: Observation | None  #: None for a step that closes the allocator
    settled_used_bytes: int = 0  #: GPU memory after the step, a wake_up() and an empty_cache()

    def fault_points(self, codes: Iterable[int] = FAULT_CODES) -> list[FaultPoint]:
        return [
            FaultPoint(function, nth, code)
            for function, count in sorted(self.calls.items())
            for nth in range(1, count + 1)
            for code in codes
        ]


@dataclass
class CaseOutcome:
    figures: CampaignFigures
    failure: str | None = None  #: what broke the promise, with the state left behind


def entry_point_calls(fake) -> dict:
    from fakecuda.harness import ENTRY_POINTS

    return {f: n for f in ENTRY_POINTS if (n := fake.call_count(f))}


def run_baseline(fake, scenario: Scenario, scale: int, seed: int = 0) -> Baseline:
    reset_driver(fake, seed)
    world = World.create(fake, global_mode=scenario.global_mode)
    try:
        scenario.setup(world, scale)
        fake.reset_call_counts()
        scenario.act(world)
        calls = entry_point_calls(fake)
        after = None if scenario.closes else Observation.of(world)
        settled = 0 if scenario.closes else _settle(world)
        violations = fake.violations()
        assert not violations, f"{scenario.name} without a fault: the double saw rule violations {violations}"
    finally:
        close_quietly(world.allocator)
    leak = leak_report(fake)
    assert leak is None, f"{scenario.name} without a fault leaked: {leak}"
    return Baseline(calls, after, settled)


def _settle(world: World) -> int:
    """Wakes everything and empties the cache: what stays mapped is what the live allocations need (plus
    what the allocator reports as release pending). Returns the GPU memory the driver counts then."""
    world.allocator.wake_up()
    world.allocator.empty_cache()
    return sum(world.fake.used_bytes(d) for d in DEVICES) - getattr(world.allocator.stats(), "bytes_release_pending", 0)


ILLEGAL_STATE = 401  # CUDA_ERROR_ILLEGAL_STATE


def _error_problem(error: BaseException, fault: FaultPoint, *, after_refusal: bool = False) -> str | None:
    """Why ``error`` is not an acceptable report of ``fault``, or None. ``after_refusal``: a wake that
    finds an object the driver still refuses to release may say so with CUDA_ERROR_ILLEGAL_STATE."""
    import gpusleep

    if isinstance(error, gpusleep.OutOfMemoryError):
        if error.device not in DEVICES or error.bytes_needed <= 0:
            return (
                f"OutOfMemoryError with values that were not measured: bytes_needed={error.bytes_needed}, "
                f"bytes_free={error.bytes_free}, device={error.device} ({error})"
            )
        return None
    if isinstance(error, (gpusleep.HostOutOfMemoryError, gpusleep.CudaError)):
        if isinstance(error, gpusleep.CudaError) and not isinstance(error, gpusleep.DriverUnavailableError):
            refused_again = after_refusal and error.code == ILLEGAL_STATE and "refuses" in str(error)
            if error.code != fault.error and not refused_again:
                return f"CudaError with code {error.code} ({error.name}) for a fault of code {fault.error}: {error}"
        return None
    return f"unexpected exception type {type(error).__name__}: {error}"


def run_fault_case(
    fake, scenario: Scenario, baseline: Baseline, fault: FaultPoint | None, scale: int, seed: int = 0
) -> CaseOutcome:
    """Builds the scenario, fails one driver call of its step (none when ``fault`` is None), and checks the
    transaction promise: the allocator is in its previous state or in the complete new one, the bytes that
    should be readable are, and after clearing the fault a wake and a close leave nothing behind."""
    figures = CampaignFigures(scenario.name, cases=1)
    outcome = CaseOutcome(figures)
    where = f"{scenario.name}: {fault.describe() if fault else 'no fault'}"
    reset_driver(fake, seed)
    world = World.create(fake, global_mode=scenario.global_mode)
    error: BaseException | None = None
    try:
        scenario.setup(world, scale)
        before = Observation.of(world)
        model_before = world.model.clone()
        model_after = world.model.clone()
        scenario.expect(model_after)

        fake.reset_call_counts()
        if fault is not None:
            fake.inject_fault(fault.function, nth=fault.nth, error=fault.error)
        try:
            scenario.act(world)
        except Exception as raised:  # noqa: BLE001 - judged below
            error = raised
        finally:
            fake.clear_faults()
        if fault is not None and fake.call_count(fault.function) >= fault.nth:
            figures.faults_injected += 1
        raised_text = "did not raise" if error is None else f"raised {type(error).__name__}: {error}"

        violations = fake.violations()
        if violations:
            outcome.failure = f"{where}: {raised_text}; the double saw rule violations {violations}"
            return outcome
        if error is not None and fault is None:
            outcome.failure = f"{where}: {raised_text}"
            return outcome
        if error is not None and (problem := _error_problem(error, fault)):
            outcome.failure = f"{where}: {problem}"
            return outcome

        if scenario.closes:
            # close() does not raise for what the driver refused: it keeps it, reports it in
            # stats().objects_release_pending (and a warning), and a second close() retries it.
            if error is not None or world.allocator.stats().objects_release_pending:
                world.allocator.close()  # the retry a user would make
        else:
            observed = Observation.of(world)
            against_before = observed.differences(before, global_mode=scenario.global_mode)
            against_after = observed.differences(baseline.after, global_mode=scenario.global_mode)
            if not against_before and against_after:
                if error is None:
                    outcome.failure = f"{where}: reported success but changed nothing (the failure was swallowed)"
                    return outcome
                model = model_before
            elif not against_after:
                model = model_after
            else:
                outcome.failure = (
                    f"{where}: {raised_text}; left a state that is neither the previous nor the new one: "
                    f"against the previous state: {'; '.join(against_before)}; against the new state: "
                    f"{'; '.join(against_after)}"
                )
                return outcome
            world.model = model
            figures.bytes_checked += read_back(fake, model.readable_blocks())
            try:
                world.allocator.wake_up()
            except Exception as stuck:  # noqa: BLE001
                outcome.failure = (
                    f"{where}: {raised_text}; afterwards, with the fault cleared, wake_up() raised "
                    f"{type(stuck).__name__}: {stuck} (sleeping tags {sorted(world.allocator.sleeping_tags)})"
                )
                return outcome
            model.wake()
            figures.bytes_checked += read_back(fake, model.readable_blocks())
            world.allocator.empty_cache()
            settled = sum(fake.used_bytes(d) for d in DEVICES) - getattr(
                world.allocator.stats(), "bytes_release_pending", 0
            )
            # Global mode: sleep and wake keep the live blocks, so the settled memory is the baseline's.
            expected_settled = (
                baseline.settled_used_bytes if scenario.global_mode else sum(model.mapped_bytes(d) for d in DEVICES)
            )
            if settled != expected_settled:
                outcome.failure = (
                    f"{where}: {raised_text}; afterwards, awake and with the cache emptied, the driver holds "
                    f"{settled} bytes not reported as release pending, expected {expected_settled}: "
                    "memory the allocator no longer accounts for"
                )
                return outcome
            world.allocator.close()
        leak = leak_report(fake)
        if leak is not None:
            figures.leaks += 1
            outcome.failure = f"{where}: {raised_text}; after clearing the fault and closing, {leak}"
        return outcome
    except AssertionError as mismatch:
        outcome.failure = (
            f"{where}: {'did not raise' if error is None else f'raised {type(error).__name__}: {error}'}; {mismatch}"
        )
        return outcome
    except Exception as unexpected:  # noqa: BLE001 - any other surprise is a failed case, reported
        outcome.failure = f"{where}: while checking the state afterwards, {type(unexpected).__name__}: {unexpected}"
        return outcome
    finally:
        fake.clear_faults()
        close_quietly(world.allocator)
        if outcome.failure is not None and figures.leaks == 0 and leak_report(fake) is not None:
            figures.leaks += 1


# ------------------------------------------------------------------------------- state machine, shared

TAGS = ("weights", "kv_cache", "default", "activations")
# The driver calls a sleep or a wake makes (what the state machines make fail).
FAULTABLE_ENTRY_POINTS = (
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemGetInfo_v2",
    "cuMemCreate",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemAddressFree",
    "cuMemHostAlloc",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemsetD8Async",
    "cuStreamCreate",
    "cuStreamSynchronize",
)
UNKNOWN_TAG = "never_used"  # no allocation and no policy until a sleep lists it


def _state_machine_base():
    """The rules both state machines share (policies, sleep, wake, host memory, writes, close) and the
    checks of the sleep state; built on first use so that tests/campaigns/soak.py does not need Hypothesis."""
    from hypothesis import strategies as st
    from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

    import gpusleep

    tag_lists = st.none() | st.lists(st.sampled_from(TAGS + (UNKNOWN_TAG,)), max_size=3)

    class AllocatorMachine(RuleBasedStateMachine):
        """Subclasses set ``fake`` and ``figures`` and add the rules that allocate and free."""

        fake = None
        figures: CampaignFigures = None  # type: ignore[assignment]
        global_mode = False
        blocks = Bundle("blocks")

        def __init__(self) -> None:
            super().__init__()
            self.figures.cases += 1
            reset_driver(self.fake, seed=self.figures.cases)
            self.world = World.create(self.fake, global_mode=self.global_mode)
            self.model = self.world.model
            self.closed = False
            self.wakes = 0

        # -- helpers ------------------------------------------------------------------------------
        def live(self, address: int) -> BlockModel | None:
            return None if self.closed else self.model.blocks.get(address)

        def gpu_memory(self) -> tuple[int, int]:
            """(GPU memory the driver holds, the part the allocator reports as refused and pending)."""
            used = sum(self.fake.used_bytes(d) for d in DEVICES)
            return used, self.world.allocator.stats().bytes_release_pending

        def check_bytes(self, blocks: Iterable[BlockModel]) -> None:
            self.figures.bytes_checked += read_back(self.fake, blocks)

        # -- rules --------------------------------------------------------------------------------
        @precondition(lambda self: not self.closed)
        @rule(block=blocks, start_fraction=st.floats(0, 1), length_fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
        def write(self, block, start_fraction, length_fraction, seed):
            b = self.live(block)
            if b is None or b.state != "mapped" or b.size_bytes == 0:
                return
            if b.content is None:  # undefined bytes: define them all first
                b.content = pattern(b.size_bytes, seed)
                self.fake.write(b.address, b.content, device=b.device)
            start = int(start_fraction * (b.size_bytes - 1))
            length = max(1, int(length_fraction * (b.size_bytes - start)))
            data = pattern(length, seed + 1)
            self.fake.write(b.address + start, data, device=b.device)
            b.content = b.content[:start] + data + b.content[start + length :]

        @precondition(lambda self: not self.closed)
        @rule(tag=st.sampled_from(TAGS + (UNKNOWN_TAG,)), policy=st.sampled_from(gpusleep.POLICIES))
        def set_policy(self, tag, policy):
            self.world.allocator.set_policy(tag, policy)
            self.model.set_policy(tag, policy)

        @precondition(lambda self: not self.closed)
        @rule(level=st.sampled_from([1, 2]), offload_tags=tag_lists)
        def sleep(self, level, offload_tags):
            if level == 2 and offload_tags is not None:
                return  # a ValueError by contract, checked in test_core_state.py
            mapped_before = {a for a, b in self.model.blocks.items() if b.state == "mapped"}
            used_before, pending_before = self.gpu_memory()
            report = self.world.allocator.sleep(level=level, offload_tags=offload_tags)
            used_after, pending_after = self.gpu_memory()
            freed, retried = used_before - used_after, pending_before - pending_after
            assert report.bytes_freed in (freed, freed - retried), (
                f"sleep({level}) reports {report.bytes_freed} bytes freed; the driver freed {freed} "
                f"({retried} of them refused earlier and released now)"
            )
            expected = self.model.sleep(level, offload_tags)
            assert sorted(report.tags) == expected, (
                f"sleep({level}, {offload_tags}) put {report.tags} to sleep, expected {expected}"
            )
            offloaded_now = sum(
                b.size_bytes for a, b in self.model.blocks.items() if a in mapped_before and b.state == "offloaded"
            )
            if self.global_mode:  # whole segments are copied, free arena blocks included
                assert report.bytes_offloaded >= offloaded_now, (
                    f"sleep({level}) offloaded {report.bytes_offloaded} < {offloaded_now} bytes of live blocks"
                )
            else:
                assert report.bytes_offloaded == offloaded_now, (
                    f"sleep({level}) offloaded {report.bytes_offloaded}, expected {offloaded_now}"
                )

        @precondition(lambda self: not self.closed)
        @rule(tags=tag_lists, zero_fill=st.booleans())
        def wake_up(self, tags, zero_fill):
            try:
                expected = self.model.wake(tags, zero_fill)
            except KeyError:
                with pytest_raises(ValueError):
                    self.world.allocator.wake_up(tags=tags, zero_fill=zero_fill)
                return
            used_before, pending_before = self.gpu_memory()
            report = self.world.allocator.wake_up(tags=tags, zero_fill=zero_fill)
            self.wakes += 1
            used_after, pending_after = self.gpu_memory()
            mapped = used_after - used_before + (pending_before - pending_after)
            assert report.bytes_mapped == mapped, (
                f"wake_up({tags}) reports {report.bytes_mapped} bytes mapped; the driver mapped {mapped}"
            )
            assert sorted(report.tags) == sorted(expected), f"wake_up({tags}) woke {report.tags}, expected {expected}"
            self.check_bytes(b for b in self.model.readable_blocks() if b.tag in expected)

        # Pinning needs a context: before its first allocation the allocator refuses (documented).
        @precondition(lambda self: not self.closed and self.model.tags_with_memory_ever)
        @rule(num_bytes=st.none() | st.integers(0, 8 * MiB))
        def reserve_host_memory(self, num_bytes):
            report = self.world.allocator.reserve_host_memory(num_bytes)
            if num_bytes is not None:
                assert report.bytes_pinned - report.bytes_in_use >= num_bytes, (
                    f"reserve_host_memory({num_bytes}) left {report}"
                )

        @precondition(lambda self: not self.closed)
        @rule()
        def release_host_memory(self):
            before = self.world.allocator.stats().host
            released = self.world.allocator.release_host_memory()
            after = self.world.allocator.stats().host
            assert after.bytes_pinned == before.bytes_pinned - released
            assert after.bytes_in_use == before.bytes_in_use, "backups survive release_host_memory()"

        @precondition(lambda self: not self.closed)
        @rule()
        def read_everything(self):
            self.check_bytes(self.model.readable_blocks())

        # -- one driver call fails during a sleep or a wake, in whatever state the machine has built ----
        def _with_a_fault(self, fault: FaultPoint, step, expect) -> None:
            """Runs ``step`` with ``fault`` armed. If it raises, the state must be exactly the previous one
            (the model is left as it was); if not, ``expect`` applies the step to the model and the
            invariants check the rest (what the driver refused to release must be reported pending)."""
            before = Observation.of(self.world)
            self.fake.reset_call_counts()
            self.fake.inject_fault(fault.function, nth=fault.nth, error=fault.error)
            try:
                step()
                error = None
            except Exception as raised:  # noqa: BLE001 - judged below
                error = raised
            finally:
                self.fake.clear_faults()
            if self.fake.call_count(fault.function) >= fault.nth:
                self.figures.faults_injected += 1
            if error is None:
                expect()
                return
            problem = _error_problem(error, fault, after_refusal=True)
            assert problem is None, f"{fault.describe()}: {problem}"
            found = Observation.of(self.world).differences(before, global_mode=self.global_mode)
            assert not found, (
                f"{fault.describe()}: raised {type(error).__name__}: {error}; yet the state changed: {found}"
            )

        @precondition(lambda self: not self.closed)
        @rule(
            level=st.sampled_from([1, 2]),
            function=st.sampled_from(FAULTABLE_ENTRY_POINTS),
            nth=st.integers(1, 6),
            code=st.sampled_from(FAULT_CODES),
        )
        def sleep_with_a_fault(self, level, function, nth, code):
            self._with_a_fault(
                FaultPoint(function, nth, code),
                lambda: self.world.allocator.sleep(level=level),
                lambda: self.model.sleep(level),
            )

        @precondition(lambda self: not self.closed and self.model.sleeping_tags())
        @rule(
            zero_fill=st.booleans(),
            function=st.sampled_from(FAULTABLE_ENTRY_POINTS),
            nth=st.integers(1, 6),
            code=st.sampled_from(FAULT_CODES),
        )
        def wake_up_with_a_fault(self, zero_fill, function, nth, code):
            woken: list[str] = []

            def expect() -> None:
                woken.extend(self.model.wake(None, zero_fill))

            self._with_a_fault(
                FaultPoint(function, nth, code),
                lambda: self.world.allocator.wake_up(zero_fill=zero_fill),
                expect,
            )
            self.check_bytes(b for b in self.model.readable_blocks() if b.tag in woken)

        # Close ends the example, so it comes only after two wakes: the steps before it have built a state.
        @precondition(lambda self: not self.closed and self.wakes >= 2)
        @rule()
        def close(self):
            self.check_bytes(self.model.readable_blocks())
            self.world.allocator.close()
            self.closed = True
            self.model.blocks.clear()
            leak = leak_report(self.fake)
            if leak:
                self.figures.leaks += 1
            assert leak is None, f"close() left {leak}"
            with pytest_raises(gpusleep.SleepStateError):
                self.world.allocator.allocate(1, tag="weights")

        @precondition(lambda self: self.closed)
        @rule(tag=st.sampled_from(TAGS))
        def calls_after_close_raise(self, tag):
            for call in (
                lambda: self.world.allocator.allocate(1, tag=tag),
                lambda: self.world.allocator.sleep(level=1),
                lambda: self.world.allocator.wake_up(),
            ):
                with pytest_raises(gpusleep.SleepStateError):
                    call()
            self.world.allocator.close()  # a second close is a no-op

        # -- invariants -----------------------------------------------------------------------------
        @invariant()
        def sleep_state_matches_the_model(self):
            if self.closed:
                return
            allocator = self.world.allocator
            assert allocator.sleeping_tags == self.model.sleeping_tags()
            assert allocator.is_sleeping == bool(self.model.sleeping_tags())
            stats = allocator.stats()
            for name, t in self.model.tags.items():
                got = stats.tags.get(name)
                live = [b for b in self.model.blocks.values() if b.tag == name]
                if got is None:
                    assert not live, f"tag {name!r} holds {len(live)} allocations but has no stats"
                    continue
                assert got.is_sleeping == t.asleep, f"stats of {name!r}: is_sleeping={got.is_sleeping}"
                assert got.policy == t.policy, f"stats of {name!r}: policy={got.policy}, set {t.policy}"
                assert got.allocations == len(live), (
                    f"stats of {name!r}: {got.allocations} allocations, model {len(live)}"
                )
                if t.asleep:
                    assert got.bytes_mapped == 0, f"sleeping tag {name!r} still maps {got.bytes_mapped} bytes"
            # Pinned host copies take whole 4 KiB pages (docs/host-tiers.md): at most one page tail per allocation.
            page_tails = 4095 * sum(t.allocations for t in stats.tags.values())
            assert stats.bytes_backed_up <= stats.host.bytes_in_use <= stats.bytes_backed_up + page_tails, (
                f"host memory in use {stats.host}, backed up {stats.bytes_backed_up}"
            )
            assert stats.host.bytes_pinned >= stats.host.bytes_in_use
            violations = self.fake.violations()
            assert not violations, f"the double saw rule violations: {violations}"

        def teardown(self):
            try:
                if not self.closed:
                    self.check_bytes(self.model.readable_blocks())
                    self.world.allocator.close()
                    leak = leak_report(self.fake)
                    if leak:
                        self.figures.leaks += 1
                    assert leak is None, f"close() left {leak}"
                violations = self.fake.violations()
                assert not violations, f"the double saw rule violations: {violations}"
            finally:
                close_quietly(self.world.allocator)

    return AllocatorMachine


def pytest_raises(kind):
    import pytest

    return pytest.raises(kind)


def state_machine_settings(examples: int, steps: int):
    """Hypothesis settings for a campaign at the current scale: no deadline (the double is slow on a
    busy machine), no database (each CI run explores afresh), fixtures reset per example by the machine."""
    from hypothesis import HealthCheck, settings

    scale = campaign_scale()
    return settings(
        max_examples=examples * scale,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
    )


# ------------------------------------------------------------------------------ refused, then retried

RELEASE_ENTRY_POINTS = ("cuMemUnmap", "cuMemRelease", "cuMemAddressFree")


def populate_small(world: World, scale: int) -> None:
    """Two chunks of weights on device 0 and a discarded allocation on device 1: few driver calls."""
    g = world.model.granularity_bytes
    for _ in range(scale):
        world.allocate(g + 100, "weights", 0)
        world.allocate(g - 1, "kv_cache", 1)


SMALL_SLEEP = Scenario("small_sleep_level1", populate_small, *_sleep(1))


def wake_calls_after_refusal(fake, scenario: Scenario, refusal: FaultPoint, scale: int) -> dict:
    """The driver calls of the wake_up() that follows ``scenario``'s step with ``refusal`` injected."""
    reset_driver(fake, 0)
    world = World.create(fake, global_mode=scenario.global_mode)
    try:
        scenario.setup(world, scale)
        fake.inject_fault(refusal.function, nth=refusal.nth, error=refusal.error)
        try:
            scenario.act(world)
        except Exception:  # noqa: BLE001 - the case itself judges it
            pass
        fake.clear_faults()
        fake.reset_call_counts()
        world.allocator.wake_up()
        return entry_point_calls(fake)
    finally:
        close_quietly(world.allocator)


def run_refusal_then_wake_fault(
    fake, scenario: Scenario, refusal: FaultPoint, wake_fault: FaultPoint, scale: int
) -> CaseOutcome:
    """The driver refuses a release during the step, then one call of the next wake_up() (which retries
    the refused objects first) fails too. Afterwards, with no fault, a wake must bring back every byte,
    the settled GPU memory must be what the live allocations need, and close() must leave nothing."""
    figures = CampaignFigures(scenario.name, cases=1)
    outcome = CaseOutcome(figures)
    where = f"{scenario.name}: {refusal.describe()}, then in the next wake_up() {wake_fault.describe()}"
    reset_driver(fake, 0)
    world = World.create(fake, global_mode=scenario.global_mode)
    try:
        scenario.setup(world, scale)
        model = world.model.clone()
        fake.inject_fault(refusal.function, nth=refusal.nth, error=refusal.error)
        try:
            scenario.act(world)
            scenario.expect(model)  # the step completed; what it refused is kept and retried
        except Exception:  # noqa: BLE001 - a step that raised must have changed nothing
            model = world.model.clone()
        fake.clear_faults()
        figures.faults_injected += 1
        fake.reset_call_counts()
        fake.inject_fault(wake_fault.function, nth=wake_fault.nth, error=wake_fault.error)
        try:
            world.allocator.wake_up()
        except Exception as error:  # noqa: BLE001
            if problem := _error_problem(error, wake_fault, after_refusal=True):
                outcome.failure = f"{where}: {problem}"
                return outcome
        finally:
            fake.clear_faults()
        if fake.call_count(wake_fault.function) >= wake_fault.nth:
            figures.faults_injected += 1
        violations = fake.violations()
        if violations:
            outcome.failure = f"{where}: the double saw rule violations {violations}"
            return outcome
        world.allocator.wake_up()
        model.wake()
        figures.bytes_checked += read_back(fake, model.readable_blocks())
        world.allocator.empty_cache()
        stats = world.allocator.stats()
        settled = sum(fake.used_bytes(d) for d in DEVICES) - getattr(stats, "bytes_release_pending", 0)
        expected = sum(model.mapped_bytes(d) for d in DEVICES)
        if settled != expected:
            outcome.failure = (
                f"{where}: once awake, the driver holds {settled} bytes not reported as pending, expected {expected}"
            )
            return outcome
        world.allocator.close()
        leak = leak_report(fake)
        if leak is not None:
            figures.leaks += 1
            outcome.failure = f"{where}: after close(), {leak}"
        return outcome
    except Exception as unexpected:  # noqa: BLE001
        outcome.failure = f"{where}: {type(unexpected).__name__}: {unexpected}"
        return outcome
    finally:
        fake.clear_faults()
        close_quietly(world.allocator)

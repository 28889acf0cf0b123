"""The optional capabilities of a controller are typing.Protocols the gate checks with isinstance: a controller
opts in by having the member (a property or a method), and one without it works with the gate all the same."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

anyio = pytest.importorskip("anyio")

from gpusleep.server.gate import (  # noqa: E402
    ChecksSleep,
    KnowsTags,
    ReportsSleepingTags,
    ReportsSleepLevel,
    ReportsStats,
    SleepGate,
    UnknownTagsError,
    known_tags,
    sleeps_tags,
)


class Minimal:
    """Only what SleepController requires."""

    def __init__(self, sleeping: bool = False) -> None:
        self.is_sleeping = sleeping
        self.calls: list = []

    def sleep(self, level: int):
        self.calls.append(("sleep", level))
        self.is_sleeping = True

    def wake_up(self, tags: Sequence[str] | None):
        self.calls.append(("wake_up", tags))
        self.is_sleeping = False


class Full(Minimal):
    """Every optional capability: tags as a method, sleeping tags and level as properties, a sleep check."""

    def __init__(self, sleeping: bool = False, level: int = 0, refuse: Exception | None = None) -> None:
        super().__init__(sleeping)
        self._level = level
        self._asleep: set = {"weights", "kv_cache"} if sleeping else set()
        self.refuse = refuse

    def known_tags(self):
        return ["weights", "kv_cache"]

    @property
    def sleeping_tags(self):
        return frozenset(self._asleep)

    @property
    def sleep_level(self) -> int:
        return self._level

    def check_sleep(self, level: int) -> None:
        if self.refuse is not None:
            raise self.refuse

    def sleep(self, level: int, tags: Sequence[str] | None = None):
        self.calls.append(("sleep", level, tags))
        self._asleep |= set(tags or ("weights", "kv_cache"))
        self._level = level
        self.is_sleeping = True

    def wake_up(self, tags: Sequence[str] | None):
        super().wake_up(tags)
        self._asleep.clear()


def test_a_minimal_controller_has_no_optional_capability():
    controller = Minimal()
    assert not any(isinstance(controller, p) for p in (ChecksSleep, KnowsTags, ReportsSleepLevel, ReportsSleepingTags))
    assert not sleeps_tags(controller)
    gate = SleepGate(Minimal(sleeping=True))
    assert gate.sleep_level == 1, "a sleeping controller that reports no level sleeps at level 1"

    async def scenario():
        with pytest.raises(ValueError, match="cannot put single tags to sleep"):
            await gate.sleep(1, tags=["weights"])
        woken = await gate.wake_up(tags=["anything"])  # no known tags: nothing to check them against
        assert not woken.is_sleeping and gate.controller.calls == [("wake_up", ["anything"])]

    anyio.run(scenario)


def test_a_full_controller_is_each_protocol_and_the_gate_uses_them():
    controller = Full(sleeping=True, level=2)
    assert all(isinstance(controller, p) for p in (ChecksSleep, KnowsTags, ReportsSleepLevel, ReportsSleepingTags))
    assert sleeps_tags(controller)
    gate = SleepGate(controller)
    assert gate.sleep_level == 2

    async def scenario():
        with pytest.raises(UnknownTagsError) as refused:
            await gate.wake_up(tags=["weights", "lora"])
        assert refused.value.unknown == {"lora"} and refused.value.known == {"weights", "kv_cache"}
        assert controller.calls == [], "an unknown tag is refused before the controller is called"
        await gate.wake_up()
        outcome = await gate.sleep(1, tags=["kv_cache"])
        assert not outcome.already_sleeping and controller.calls[-1] == ("sleep", 1, ["kv_cache"])
        again = await gate.sleep(1, tags=["kv_cache"])  # the tag already sleeps: a no-op
        assert again.already_sleeping and len(controller.calls) == 2
        controller.refuse = RuntimeError("no CUDA device")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            await gate.sleep(2)
        assert len(controller.calls) == 2, "check_sleep refused before sleep was called"

    anyio.run(scenario)


def test_a_member_set_to_none_is_no_capability():
    controller = Minimal()
    controller.check_sleep = None
    controller.known_tags = None
    assert not isinstance(controller, ChecksSleep), "a method protocol needs a member that is not None"
    assert isinstance(controller, KnowsTags)  # a property protocol only needs the member ...
    gate = SleepGate(controller)

    async def scenario():
        await gate.sleep(1)  # ... and the gate reads None as "no check" and "tags unknown"
        await gate.wake_up(tags=["anything"])

    anyio.run(scenario)
    assert controller.calls == [("sleep", 1), ("wake_up", ["anything"])]


class WithStats(Minimal):
    def stats(self):
        return {"tags": {}}


def test_stats_is_a_capability_too():
    assert isinstance(WithStats(), ReportsStats) and not isinstance(Minimal(), ReportsStats)
    controller = Minimal()
    controller.stats = None
    assert not isinstance(controller, ReportsStats), "a method protocol needs a member that is not None"


@pytest.mark.parametrize("as_method", [True, False], ids=["method", "property"])
def test_known_tags_reads_a_property_or_a_method_and_none_is_unknown(as_method):
    class Tagged(Minimal):
        if as_method:

            def known_tags(self):
                return ["weights"]
        else:
            known_tags = ("weights",)

    assert known_tags(Tagged()) == frozenset({"weights"})
    assert known_tags(Minimal()) is None
    untagged = Minimal()
    untagged.known_tags = None
    assert known_tags(untagged) is None

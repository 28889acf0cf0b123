"""gpusleep/stats.py mirrors the core's record types field for field: every read-only property of a ``_C`` report
type has a field of the same name in the stats.py dataclass of the same name, and every field of that dataclass
comes from such a property. A field added to one side only fails here, so the typed stats never silently drop
(or invent) a figure of the core. The few differences on purpose are listed, with the reason."""

from __future__ import annotations

import dataclasses

import pytest

from gpusleep import _C, stats

#: The _C report types and their stats.py dataclass (same name).
MIRRORED = ("AllocatorStats", "HostMemoryReport", "SleepReport", "TagStats", "WakePlan", "WakeReport")
#: Core properties that stats.py folds into another field, on purpose.
FOLDED = {
    ("AllocatorStats", "has_sleep"): "last_sleep is None when the core has no last sleep",
    ("AllocatorStats", "has_wake"): "last_wake is None when the core has no last wake",
}
#: Core record types without a dataclass of their own, and where they go instead.
NOT_MIRRORED = {
    "HostPlacement": "SleepReport.placements: (tag, tier, bytes) tuples",
    "DeviceInfo": "read by gpusleep doctor only",
    "HostMemoryBudget": "carried by HostOutOfMemoryError, not a stats record",
}
#: The fields of a HostPlacement, in the order of a SleepReport.placements tuple.
PLACEMENT_FIELDS = ("tag", "tier", "bytes")


def core_fields(cls: type) -> set[str]:
    return {name for name, value in vars(cls).items() if isinstance(value, property)}


def python_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def mismatches(name: str, core_cls: type, python_cls: type) -> list[str]:
    """What one side has and the other lacks, less the FOLDED differences."""
    core, python = core_fields(core_cls), python_fields(python_cls)
    folded = {field for (owner, field) in FOLDED if owner == name}
    return [f"_C.{name}.{f} has no stats.{name} field" for f in sorted(core - python - folded)] + [
        f"stats.{name}.{f} has no _C.{name} property" for f in sorted(python - core)
    ]


def core_record_types() -> set[str]:
    return {name for name, value in vars(_C).items() if isinstance(value, type) and name != "Allocator"}


@pytest.mark.parametrize("name", MIRRORED)
def test_each_report_type_is_mirrored_field_for_field(name):
    assert mismatches(name, getattr(_C, name), getattr(stats, name)) == []


def test_every_core_record_type_is_mirrored_or_listed():
    assert core_record_types() == set(MIRRORED) | set(NOT_MIRRORED)


def test_the_folded_properties_still_exist():
    for owner, field in FOLDED:
        assert field in core_fields(getattr(_C, owner)), f"_C.{owner}.{field} is gone: drop it from FOLDED"


def test_a_placement_is_a_tag_a_tier_and_bytes():
    assert core_fields(_C.HostPlacement) == set(PLACEMENT_FIELDS)


def test_a_field_added_to_one_side_only_is_found():
    """The check itself: a property the Python side lacks, and a field the core lacks, are both reported."""

    @dataclasses.dataclass(frozen=True)
    class PythonWithMore(stats.WakePlan):
        invented_seconds: float = 0.0

    # The core type as a build with one more property would have it.
    core_union = type("CoreUnion", (), {**vars(_C.WakePlan), "bytes_new_figure": property(lambda self: 0)})
    assert mismatches("WakePlan", core_union, stats.WakePlan) == [
        "_C.WakePlan.bytes_new_figure has no stats.WakePlan field"
    ]
    assert mismatches("WakePlan", _C.WakePlan, PythonWithMore) == [
        "stats.WakePlan.invented_seconds has no _C.WakePlan property"
    ]

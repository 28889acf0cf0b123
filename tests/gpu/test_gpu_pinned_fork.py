"""fork() after reserve_host_memory() on a real GPU (review 2026-12-06 section C item 6, issue 19;
Note [Placing pinned backups]). The worker prints its measurements; fork time is a fact, not asserted."""

from __future__ import annotations

import pytest
from gpu_workers import run_script

pytestmark = pytest.mark.gpu


def test_a_forked_child_does_not_inherit_the_pinned_backups():
    f = run_script(["_fork_worker.py"])
    print({k: v for k, v in f.items()})  # shown with -s / on failure: fork time and RSS for the review
    reserve, child = f["reserve_bytes"], f["gpusleep"]
    assert f["bytes_newly_pinned"] == reserve
    assert child["child_exit"] == 0
    if f["numa_node"] >= 0:  # placed: the mapping is this process's memory, and gpusleep marked it
        assert f["region_found"]
        assert {"dc", "dd"} <= set(f["vmflags"]), f["vmflags"]
        assert f["numa_policy"] == f"bind:{f['numa_node']}"
        assert child["child_has_region"] is False
        # The child holds neither a copy nor a share of the pinned pages.
        assert child["child_rss_bytes"] < child["parent_rss_bytes"] - reserve // 2, child

"""README.md and docs/ as a reader meets them: no path of the machine they were written on, and every file they
point at exists in the repository (links, and repository paths in backticks)."""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Home folders, workspaces and mounts of a particular machine; /tmp and /usr paths in examples are everyone's.
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|Users|root|mnt|srv|opt)/[\w.-]")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
REPO_PATH = re.compile(r"`((?:docs|tests|scripts|benchmarks|python|csrc|\.ci)/[\w./-]*[\w/])`")
#: Paths the pages quote from other projects' repositories (they say which).
OTHER_REPOSITORIES = {"tests/basic_correctness/test_cumem.py": "vLLM", "csrc/core.cpp": "torch_memory_saver"}


def page_id(page: pathlib.Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_machine_path(page):
    hits = [f"{page_id(page)}:{n}: {line.strip()}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if MACHINE_PATH.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_file_a_page_points_at_exists(page):
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (page.parent / target).exists():
            missing.append(f"link {target}")
    for target in REPO_PATH.findall(text):
        if "*" not in target and target not in OTHER_REPOSITORIES and not (REPO / target).exists():
            missing.append(f"path `{target}`")
    assert not missing, f"{page_id(page)} points at what the repository does not have: {missing}"


def test_the_checks_catch_what_they_look_for():
    assert MACHINE_PATH.search("see /work/main/.venv/bin/python") and MACHINE_PATH.search("(/home/me/gpusleep)")
    assert not MACHINE_PATH.search("mkdir -p /tmp/empty; /usr/local/cuda; ~/work/x; docs/work/y")
    assert LINK.findall("[a](docs/x.md#part) [b](https://example.com)") == ["docs/x.md", "https://example.com"]
    assert REPO_PATH.findall("`tests/test_docs.py` and `scripts/serve.sh`") == ["tests/test_docs.py", "scripts/serve.sh"]

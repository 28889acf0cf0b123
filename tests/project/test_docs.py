"""README.md and docs/ as a reader meets them: no path of the machine they were written on, and every file they
point at exists in the repository (links, and repository paths in backticks)."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
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
    hits = [
        f"{page_id(page)}:{n}: {line.strip()}"
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
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
    # The machine paths are put together here, so that this file passes its own whole-repository check below.
    assert MACHINE_PATH.search("see /" + "work/main/.venv/bin/python")
    assert MACHINE_PATH.search("(/" + "home/me/gpusleep)")
    assert not MACHINE_PATH.search("mkdir -p /tmp/empty; /usr/local/cuda; ~/work/x; docs/work/y")
    assert LINK.findall("[a](docs/x.md#part) [b](https://example.com)") == ["docs/x.md", "https://example.com"]
    assert REPO_PATH.findall("`tests/project/test_docs.py` and `scripts/serve.sh`") == [
        "tests/project/test_docs.py",
        "scripts/serve.sh",
    ]


# --------------------------------------------------------------------------------------------------------------
# The repository stands alone: no tracked file (code, comments, tests, scripts, docs) cites a page that is not in
# it or a path of the machine it was written on. The design, its invariants and the driver rules are
# docs/design.md, docs/invariants.md and docs/driver-rules.md; citations of them name sections that exist.

#: Files outside the repository that code once cited, spelled in pieces so that this file does not cite them.
OUTSIDE_FILES = ("DESIGN" + ".md", "cuda-vmm-" + "rules.md", "/" + "work/shared")
INVARIANT_CITATION = re.compile(r"invariants\.md, invariants? (\d+)(?: (?:and|to) (\d+))?")
RULES_CITATION = re.compile(r"driver-rules\.md,? (?:section |§)?(\d+b?)")


def tracked_files() -> list[pathlib.Path]:
    """The files a fresh clone has: what git tracks or would add (not what it ignores), or, outside a git
    checkout, the tree less what is built."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}
        names = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(REPO).parts) and p.suffix != ".so"
        ]
    return [REPO / n for n in sorted(names) if (REPO / n).is_file()]


def outside_citations(text: str) -> list[str]:
    """Lines of ``text`` that point outside the repository: a cited outside file or a machine path."""
    return [
        f"{n}: {line.strip()[:160]}"
        for n, line in enumerate(text.splitlines(), 1)
        if any(name in line for name in OUTSIDE_FILES) or MACHINE_PATH.search(line)
    ]


def section_numbers(page: pathlib.Path) -> set[str]:
    """The numbers of a page's ``## N. Title`` sections."""
    return set(re.findall(r"^## (\d+b?)\. ", page.read_text(), flags=re.M))


def test_no_tracked_file_points_outside_the_repository():
    files = tracked_files()
    assert REPO / "tests" / "project" / "test_docs.py" in files and REPO / "LICENSE" in files, (
        "the listing missed files"
    )
    hits = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="ignore")
        hits += [f"{path.relative_to(REPO)}:{hit}" for hit in outside_citations(text)]
    assert not hits, "tracked files cite what a fresh clone does not have:\n" + "\n".join(hits)


def test_citations_of_the_invariants_and_driver_rules_name_sections_that_exist():
    invariants = section_numbers(REPO / "docs" / "invariants.md")
    rules = section_numbers(REPO / "docs" / "driver-rules.md")
    assert invariants == {str(n) for n in range(1, 10)}, invariants
    assert {"0", "7", "12", "12b", "13"} <= rules, rules
    dangling = []
    for path in tracked_files():
        text = path.read_bytes().decode("utf-8", errors="ignore")
        for first, last in INVARIANT_CITATION.findall(text):
            dangling += [f"{path.relative_to(REPO)}: invariant {n}" for n in (first, last) if n and n not in invariants]
        cited = RULES_CITATION.findall(text)
        if path.parent.name == "simulated_gpu":  # the double's sources cite the rules as §N
            cited += re.findall(r"§(\d+b?)", text)
        dangling += [f"{path.relative_to(REPO)}: driver rules section {n}" for n in cited if n not in rules]
    assert not dangling, dangling


def test_the_whole_repository_check_catches_what_it_looks_for():
    planted = "see " + OUTSIDE_FILES[0] + " invariant 2\nok: docs/design.md\ncd /" + "home/me/src\n"
    assert outside_citations(planted) == ["1: see " + OUTSIDE_FILES[0] + " invariant 2", "3: cd /" + "home/me/src"]
    assert not outside_citations("docs/invariants.md, invariant 2; docs/driver-rules.md section 7; /tmp/x")
    assert INVARIANT_CITATION.findall("(docs/invariants.md, invariants 2 and 3)") == [("2", "3")]
    assert RULES_CITATION.findall("docs/driver-rules.md section 12b, driver-rules.md §7") == ["12b", "7"]


# --------------------------------------------------------------------------------------------------------------
# Every fenced block of README.md and docs/ says what it is, in an HTML comment on the line before it (invisible
# when rendered), and the blocks that can run do, as printed, on the simulated GPU where they need a GPU:
#   <!-- docs-test: run -->          a self-contained bash or Python block. Python runs in a fresh interpreter on
#                                    the simulated GPU (enabled first unless the block enables it itself); bash
#                                    runs as is (it says --simulate-gpu where it means it) and its background
#                                    jobs are stopped after it.
#   <!-- docs-test: run server -->   a block that talks to the page's server (localhost:8000): the test starts
#                                    `gpusleep serve --simulate-gpu` and runs the page's server blocks in order.
#   <!-- docs-test: output -->       an answer or a listing, not something to run.
#   <!-- docs-test: skip: REASON --> what truly cannot run here, and why (a real GPU, an install, a fragment).
# Ports 8000 to 8009 are replaced by free ones (other servers may hold them), and `gpusleep` is this checkout's.
# A block without a marker fails the first test below, so a new example cannot go unchecked.

import contextlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

MARKER = re.compile(r"^<!-- docs-test: (run server|run|output|skip: .+) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
PORT = re.compile(r"((?:localhost|127\.0\.0\.1):|--port )(800\d)\b")
BLOCK_TIMEOUT_S = 240


@dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int  #: of the opening fence, 1-based
    language: str
    marker: str  #: "run", "run server", "output", "skip: ...", or "" when missing
    text: str

    @property
    def id(self) -> str:
        return f"{page_id(self.page)}:{self.line}"


def fenced_blocks(page: pathlib.Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip())
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page_id(page)}:{i + 1}: a fence that is never closed"
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous)
        indent = len(lines[i]) - len(lines[i].lstrip())
        text = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        blocks.append(Block(page, i + 1, opening.group(1), marker.group(1) if marker else "", text))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
RUN_BLOCKS = [b for b in BLOCKS if b.marker == "run"]
SERVER_PAGES = sorted({b.page for b in BLOCKS if b.marker == "run server"})


def test_every_block_says_whether_it_runs():
    unmarked = [b.id for b in BLOCKS if not b.marker]
    assert not unmarked, (
        f"blocks without a <!-- docs-test: run | run server | output | skip: REASON --> line before them: {unmarked}"
    )
    wrong = [b.id for b in BLOCKS if b.marker.startswith("run") and b.language not in ("bash", "python")]
    assert not wrong, f"only bash and python blocks can run: {wrong}"


def test_the_block_parser_sees_markers_and_fences(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n<!-- docs-test: run -->\n```bash\necho hi\n```\n\n  ```json\n  {}\n  ```\n")
    run, listing = fenced_blocks(page)
    assert (run.marker, run.language, run.text, run.line) == ("run", "bash", "echo hi\n", 3)
    assert (listing.marker, listing.language, listing.text) == ("", "json", "{}\n")
    assert (
        PORT.sub(lambda m: m.group(1) + "9", "curl localhost:8000/x --port 8002 127.0.0.1:8001")
        == "curl localhost:9/x --port 9 127.0.0.1:9"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sandbox:
    """A scratch directory, free ports for 8000-8009, a ``gpusleep`` command that is this checkout's."""

    def __init__(self, tmp_path: pathlib.Path, ports: dict | None = None) -> None:
        self.dir = tmp_path
        self.ports = ports if ports is not None else {}
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "gpusleep"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gpusleep.cli "$@"\n')
        shim.chmod(0o755)
        torchrun = bin_dir / "torchrun"  # what torch's own torchrun script runs
        torchrun.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
        torchrun.chmod(0o755)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("GPUSLEEP_CUDA_DRIVER", "GPUSLEEP_SIMULATE_GPU", "GPUSLEEP_URL", "GPUSLEEP_TOKEN")
        }
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        self.env = env

    def environment(self) -> dict:
        """The environment of a block: ``gpusleep status``, ``sleep`` and ``wake`` talk to the page's port 8000."""
        return {**self.env, "GPUSLEEP_URL": f"http://127.0.0.1:{self.port(8000)}"}

    def port(self, documented: int) -> int:
        if documented not in self.ports:
            self.ports[documented] = _free_port()
        return self.ports[documented]

    def localize(self, text: str) -> str:
        return PORT.sub(lambda m: m.group(1) + str(self.port(int(m.group(2)))), text)

    def run(self, block: Block, env: dict | None = None) -> subprocess.CompletedProcess:
        text = self.localize(block.text)
        if block.language == "python":
            if "simulated_gpu" not in text:  # a block that needs a GPU runs on the simulated one
                text = "import gpusleep, gpusleep.simulated_gpu\ngpusleep.simulated_gpu.enable()\n" + text
            command = [sys.executable, "-c", text]
        else:
            command = ["bash", "-e", "-o", "pipefail", "-c", text]
        proc = subprocess.Popen(
            command,
            cwd=self.dir,
            env={**self.environment(), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with contextlib.suppress(ProcessLookupError):  # the block's background jobs
                os.killpg(proc.pid, signal.SIGTERM)
        if timed_out:
            out = f"(timed out after {BLOCK_TIMEOUT_S} s)\n" + proc.communicate(timeout=30)[0]
        return subprocess.CompletedProcess(command, proc.returncode, out)


def _check(block: Block, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{block.id} ({block.language}) exited {result.returncode}:\n{result.stdout[-6000:]}"
    assert "Traceback" not in result.stdout, f"{block.id}:\n{result.stdout[-6000:]}"


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.id)
def test_the_block_runs_as_printed(block, tmp_path):
    pytest.importorskip("gpusleep.simulated_gpu")
    from gpusleep import simulated_gpu

    try:
        simulated_gpu.library_path()
    except simulated_gpu.SimulatedGpuUnavailableError as exc:
        pytest.skip(str(exc))
    _check(block, Sandbox(tmp_path).run(block))


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 60)
@pytest.mark.parametrize("page", SERVER_PAGES, ids=page_id)
def test_the_server_blocks_run_in_order_against_a_simulated_server(page, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("fastapi")
    sandbox = Sandbox(tmp_path)
    port = sandbox.port(8000)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpusleep.cli",
            "serve",
            "--simulate-gpu",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        env=sandbox.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the simulated server exited: {server.stderr.read()[-3000:]}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "the simulated server did not start within 120 s"
            time.sleep(0.2)
        for block in [b for b in BLOCKS if b.page == page and b.marker == "run server"]:
            _check(block, sandbox.run(block))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def test_the_counter_table_lists_every_counter_the_core_reports():
    """docs/design.md's counter table is the core's list (csrc/allocator_counters.h), in order, word for word."""
    from gpusleep import _C

    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Counters (`stats().counters`)", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \| (.+) \|$", section, re.M)
    assert documented == [tuple(pair) for pair in _C.counter_descriptions()]

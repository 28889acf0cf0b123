"""What the benchmarks share: the machine description, the driver double for ``--fake`` runs, a plain-text
table, JSON output, running one measurement in a fresh subprocess, and the pinned-copy baseline."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "GPUSLEEP_BENCH "
GiB = 1 << 30
MiB = 1 << 20


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def needs_cuda_message(script: str) -> str:
    return (
        f"{script}: needs CUDA (no CUDA device or no CUDA build of torch here); nothing measured. "
        "Run it on a GPU machine, or with --fake for host-side costs through the driver double."
    )


def machine(card: str) -> dict[str, Any]:
    """Who measured: the card (or 'driver double'), date, host, versions."""
    info: dict[str, Any] = {
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    except ImportError:
        info["torch"] = None
    return info


def host_bytes_available() -> int:
    """MemAvailable from /proc/meminfo (bytes), or 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def start_driver_double(capacity_bytes: int, granularity_bytes: int = 2 * MiB) -> Any:
    """Run gpusleep on its simulated GPU (the driver double shipped in the package): one device of
    ``capacity_bytes``. Call before the first Allocator. Returns the simulated GPU (``read``, ``write``,
    ``used_bytes``)."""
    from gpusleep import simulated_gpu

    return simulated_gpu.enable(devices=1, memory_bytes=capacity_bytes, granularity_bytes=granularity_bytes, seed=0)


def format_table(rows: Sequence[Any], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (header, attribute, format spec). Rows are dataclasses or dicts."""

    def value(row: Any, attr: str) -> Any:
        return row[attr] if isinstance(row, dict) else getattr(row, attr)

    def cell(row: Any, attr: str, spec: str) -> str:
        v = value(row, attr)
        if v is None:
            return "-"
        return format(v, spec) if spec and not isinstance(v, str) else str(v)

    cells = [[cell(r, a, s) for _, a, s in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    lines = [
        "  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=False)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)) for row in cells]
    return "\n".join(lines)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Chart:
    """A bar chart of what a benchmark measured: ``bars`` are (label, value) in ``unit``. ``simulated``: measured
    on the driver double (the simulated GPU), which the picture says in its title and across it."""

    title: str
    unit: str
    bars: Sequence[tuple[str, float]]
    simulated: bool = False


def write_json(path: Path | None, payload: Any, chart: Chart | None = None) -> None:
    """The results as JSON at ``path`` and, with ``chart``, a PNG of them beside it (``path`` with ``.png``)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")
        if chart is not None:
            write_chart(path.with_suffix(".png"), chart)


def write_chart(path: Path, chart: Chart) -> Path | None:
    """Draw ``chart`` into the PNG ``path`` with matplotlib (the optional extra ``gpusleep[charts]``); without it,
    say so on stderr and return None: the JSON and the table are the results, the picture is a view of them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f'no chart: matplotlib is not installed (pip install "gpusleep[charts]"); {path.name} not written',
            file=sys.stderr,
        )
        return None
    labels = [label for label, _ in chart.bars]
    values = [value for _, value in chart.bars]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.8))
    ax.barh(range(len(values)), values, color="#9aa7b8" if chart.simulated else "#3b75af")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(chart.unit)
    for i, value in enumerate(values):
        ax.annotate(f"{value:.3g}", (value, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    title = chart.title + (
        " (SIMULATED GPU: driver double in host memory, not a GPU measurement)" if chart.simulated else ""
    )
    ax.set_title(title, fontsize=9)
    if chart.simulated:
        fig.text(0.5, 0.5, "SIMULATED", fontsize=48, color="red", alpha=0.15, ha="center", va="center", rotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Title": title, "Description": "simulated" if chart.simulated else "measured on a GPU"}
    fig.savefig(path, dpi=110, metadata=metadata)
    plt.close(fig)
    return path


def emit(payload: Any) -> None:
    """A worker's result line, read back by run_worker()."""
    print(RESULT_PREFIX + json.dumps(to_jsonable(payload)), flush=True)


def run_worker(script: Path, args: Sequence[str], timeout_s: int) -> tuple[Any | None, str]:
    """Run ``python SCRIPT ARGS`` in a fresh process (no driver double); return (payload, error text)."""
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout_s, env=env
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return None, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
    return json.loads(lines[-1][len(RESULT_PREFIX) :]), ""


@dataclass(frozen=True)
class CopyBaseline:
    """A plain copy of the same tensors to / from one pinned host buffer (GPU), or host memcpy (--fake)."""

    kind: str
    num_bytes: int
    d2h_seconds: float
    h2d_seconds: float

    @property
    def seconds(self) -> float:
        """Out and back: the least a switch that copies both ways can take."""
        return self.d2h_seconds + self.h2d_seconds

    @property
    def d2h_gbps(self) -> float:
        return self.num_bytes / self.d2h_seconds / 1e9 if self.d2h_seconds else 0.0

    @property
    def h2d_gbps(self) -> float:
        return self.num_bytes / self.h2d_seconds / 1e9 if self.h2d_seconds else 0.0


def pinned_copy_baseline(tensors: Sequence) -> CopyBaseline:
    """Best of two plain ``copy_`` of ``tensors`` (uint8) into one pinned host buffer and back; the buffer is
    given back to the driver afterwards (PyTorch's host cache would keep it pinned)."""
    import torch

    total = sum(t.numel() for t in tensors)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    slices, offset = [], 0
    for t in tensors:
        slices.append(host[offset : offset + t.numel()])
        offset += t.numel()

    def timed(copy) -> float:
        best = float("inf")
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    # (F821: the lambdas run before `del slices` below)
    d2h = timed(lambda: [s.copy_(t, non_blocking=True) for s, t in zip(slices, tensors, strict=False)])  # noqa: F821
    h2d = timed(lambda: [t.copy_(s, non_blocking=True) for s, t in zip(slices, tensors, strict=False)])  # noqa: F821
    del host, slices
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    return CopyBaseline("pinned copy_", total, d2h, h2d)

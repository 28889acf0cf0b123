"""A GPU and host-memory ledger shared by the stand-in backends of tests/switch/test_switch_kinds.py, in a directory.

The driver double gives each process its own GPU, so the stand-ins keep the one GPU they share here: each
writes what it holds (GPU bytes, host bytes) under a file lock, and every write records the peak of the
totals. A stand-in's start-up refuses to run, as vLLM's does ("free memory ... is less than desired"), when
the others leave it less than it needs, and a wake-up answers out of memory the same way. Entries of
processes that are gone do not count (a crashed backend's memory is free again). (A helper module, not a
test file.)"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from collections.abc import Iterator


class Ledger:
    def __init__(self, directory: str, capacity_bytes: int) -> None:
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_bytes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _entries(self) -> dict[str, dict]:
        entries = {}
        for path in self.dir.glob("held-*.json"):
            entry = json.loads(path.read_text())
            try:
                os.kill(entry["pid"], 0)
            except ProcessLookupError:
                continue  # gone: its memory is free
            entries[entry["name"]] = entry
        return entries

    def totals(self) -> tuple[int, int]:
        with self._locked():
            entries = self._entries()
        return sum(e["gpu"] for e in entries.values()), sum(e["host"] for e in entries.values())

    def hold(self, name: str, gpu: int, host: int, check_gpu: bool = True) -> bool:
        """Record that ``name`` holds ``gpu`` and ``host`` bytes now; ``False`` (nothing recorded) when
        ``check_gpu`` and the GPU has not that much free."""
        with self._locked():
            entries = self._entries()
            others = sum(e["gpu"] for n, e in entries.items() if n != name)
            if check_gpu and others + gpu > self.capacity:
                self._event(f"{name} refused: needs {gpu}, free {self.capacity - others}")
                return False
            safe = "".join(c if c.isalnum() else "_" for c in name)
            (self.dir / f"held-{safe}.json").write_text(
                json.dumps({"name": name, "pid": os.getpid(), "gpu": gpu, "host": host})
            )
            entries[name] = {"gpu": gpu, "host": host}
            total_gpu = sum(e["gpu"] for e in entries.values())
            total_host = sum(e["host"] for e in entries.values())
            peaks = self.peaks()
            (self.dir / "peaks.json").write_text(
                json.dumps({"gpu": max(peaks["gpu"], total_gpu), "host": max(peaks["host"], total_host)})
            )
            self._event(f"{name} holds gpu={gpu} host={host} (totals gpu={total_gpu} host={total_host})")
            return True

    def free_bytes(self, name: str) -> int:
        with self._locked():
            return self.capacity - sum(e["gpu"] for n, e in self._entries().items() if n != name)

    def peaks(self) -> dict:
        path = self.dir / "peaks.json"
        return json.loads(path.read_text()) if path.exists() else {"gpu": 0, "host": 0}

    def _event(self, line: str) -> None:
        with open(self.dir / "events.log", "a") as f:
            f.write(line + "\n")

    def events(self) -> str:
        path = self.dir / "events.log"
        return path.read_text() if path.exists() else ""

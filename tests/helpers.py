"""Small helpers shared by the CPU tests."""

from __future__ import annotations

import random

MiB = 1 << 20


def pattern(num_bytes: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (never all-zero, never the double's 0xA5 poison)."""
    return random.Random(seed).randbytes(num_bytes)

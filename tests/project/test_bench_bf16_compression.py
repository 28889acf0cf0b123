"""benchmarks/bench_bf16_compression.py: the figures that decide compressed host copies (docs/design.md)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT, load_benchmark

bench = load_benchmark("bench_bf16_compression")


def bf16_words(values: np.ndarray) -> np.ndarray:
    """float32 values truncated to bf16, as uint16 words."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_huffman_code_lengths_are_optimal_and_complete():
    lengths = bench.huffman_code_lengths(np.array([5, 0, 1, 1, 2]))
    assert list(lengths) == [1, 0, 3, 3, 2]
    used = lengths[lengths > 0]
    assert sum(2.0**-used) == 1.0  # a complete prefix code (Kraft equality)
    assert list(bench.huffman_code_lengths(np.array([0, 7, 0]))) == [0, 1, 0]


def test_one_exponent_compresses_to_the_raw_low_plane_plus_one_bit():
    rng = np.random.default_rng(0)
    values = rng.uniform(1.0, 2.0, 4096)  # every value has the exponent of 1.0
    row = bench.measure_group("one", [bf16_words(values)], link_gbs=50.0)
    assert row.exponent_entropy_bits == 0.0 and row.huffman_bits == 1.0
    assert row.ratio_entropy == 0.5 and row.ratio_huffman == 9 / 16
    assert row.decode_gbs_needed == pytest.approx(50.0 / (9 / 16))
    assert row.size_bytes == 2 * 4096


def test_gaussian_weights_land_in_the_published_range_and_random_words_do_not_compress():
    rng = np.random.default_rng(1)
    gaussian = bench.measure_group("g", [bf16_words(rng.normal(0, 0.02, 1 << 16))], link_gbs=50.0)
    assert 0.6 < gaussian.ratio_huffman < 0.8
    assert gaussian.exponent_entropy_bits <= gaussian.huffman_bits < gaussian.exponent_entropy_bits + 1
    noise = bench.measure_group("n", [rng.integers(0, 1 << 16, 1 << 16, dtype=np.uint16)], link_gbs=50.0)
    assert noise.ratio_huffman > 0.99


def test_a_checkpoint_is_read_by_its_bf16_tensors_only(tmp_path):
    words = bf16_words(np.linspace(-1, 1, 12))
    path = tmp_path / "model.safetensors"
    write_safetensors(
        path,
        {
            "w": ("BF16", [3, 4], words.tobytes()),
            "f": ("F32", [2], np.ones(2, np.float32).tobytes()),
            "b": ("BF16", [2], words[:2].tobytes()),
        },
    )
    found = list(bench.safetensors_bf16(path))
    assert [group for group, _ in found] == ["matrices", "vectors"]
    assert np.array_equal(found[0][1], words) and np.array_equal(found[1][1], words[:2])

    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_bf16_compression.py"), "--safetensors", str(path)]
        + ["--link-gbs", "25", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["link_gbs"] == 25 and [r["group"] for r in result["rows"]] == ["matrices", "vectors", "all"]
    assert result["rows"][-1]["size_bytes"] == 2 * (12 + 2)
    assert "GPU decode GB/s needed" in proc.stdout
